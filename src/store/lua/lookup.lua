-- One round trip from domain to record. KEYS: domain claim. ARGV: record key prefix.
-- The record key shares the claim's prefix (and so its hash tag in cluster mode).
local id = redis.call('GET', KEYS[1])
if not id then
  return nil
end
return redis.call('GET', ARGV[1] .. id)
