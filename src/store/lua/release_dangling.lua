-- Frees a claim whose record is gone (left by eviction or a partial failure), if unchanged.
-- KEYS: domain claim, the holder's record, the holder's stats. ARGV: holder id.
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('EXISTS', KEYS[2]) == 0 then
  -- No stats may outlive their record.
  redis.call('DEL', KEYS[3])
  return redis.call('DEL', KEYS[1])
end
return 0
