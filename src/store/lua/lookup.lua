-- One round trip from domain to record, with the store's position, so a reader can tell an
-- absent record from a store that lost its history.
-- KEYS: domain claim, epoch, version. ARGV: record key prefix.
-- The record key shares the claim's prefix (and so its hash tag in cluster mode).
local record = false
local id = redis.call('GET', KEYS[1])
if id then
  record = redis.call('GET', ARGV[1] .. id)
end
return {record, redis.call('GET', KEYS[2]), redis.call('GET', KEYS[3])}
