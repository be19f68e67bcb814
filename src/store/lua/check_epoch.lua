-- A reader that saw version V at epoch E finds the store below V at E: the history went
-- backwards (failover to a replica that lost writes). Replace the epoch so every other reader
-- and writer learns it too. Returns the current epoch.
-- KEYS: epoch, version. ARGV: seen epoch, seen version, fresh epoch id.
local epoch = redis.call('GET', KEYS[1])
local version = tonumber(redis.call('GET', KEYS[2]) or '0')
if (not epoch) or (epoch == ARGV[1] and version < tonumber(ARGV[2])) then
  epoch = ARGV[3]
  redis.call('SET', KEYS[1], epoch)
end
return epoch
