-- Adds a batch of access counters: the proxy aggregates traffic in memory and flushes it here,
-- one call per batch. Counters live in a hash apart from the record, so counting never bumps
-- the version, rewrites the JSON or races a compare-and-set update.
-- KEYS: pairs of (mapping record, its stats hash). ARGV: per pair count, bytes in, bytes out,
--       last access in Unix ms.
-- A pair whose record is gone is skipped, so a deleted mapping leaves no stats behind.
local applied = 0
for i = 1, #KEYS, 2 do
  local a = (i - 1) * 2
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local stats = KEYS[i + 1]
    redis.call('HINCRBY', stats, 'access_count', ARGV[a + 1])
    redis.call('HINCRBY', stats, 'bytes_in', ARGV[a + 2])
    redis.call('HINCRBY', stats, 'bytes_out', ARGV[a + 3])
    -- Batches from several nodes arrive in any order: the last access only moves forward.
    local last = tonumber(redis.call('HGET', stats, 'last_access_at') or '')
    if not last or tonumber(ARGV[a + 4]) > last then
      redis.call('HSET', stats, 'last_access_at', ARGV[a + 4])
    end
    applied = applied + 1
  end
end
return applied
