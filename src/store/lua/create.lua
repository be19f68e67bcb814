-- KEYS: version, changes, domain claim, record, all index, expiry index, [client index], [user index]
-- ARGV: id, record json (no version), domain, channel, changes maxlen, expires ms or '',
--       has client ('1'/'0'), has user ('1'/'0')
local holder = redis.call('GET', KEYS[3])
if holder then
  return {'taken', holder}
end
local v = log_change(KEYS[1], KEYS[2], ARGV[5], 'created', ARGV[1], ARGV[3], '')
redis.call('SET', KEYS[3], ARGV[1])
redis.call('SET', KEYS[4], with_version(ARGV[2], v))
redis.call('ZADD', KEYS[5], 0, ARGV[1])
if ARGV[6] ~= '' then
  redis.call('ZADD', KEYS[6], ARGV[6], ARGV[1])
end
local k = 7
if ARGV[7] == '1' then
  redis.call('ZADD', KEYS[k], 0, ARGV[1])
  k = k + 1
end
if ARGV[8] == '1' then
  redis.call('ZADD', KEYS[k], 0, ARGV[1])
end
publish(ARGV[4], 'created', v, ARGV[1], ARGV[3], '')
return {'ok', v, EPOCH}
