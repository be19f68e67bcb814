-- KEYS: version, changes, record, domain claim, all index, expiry index, stats,
--       [client index], [user index], [group index]
-- ARGV: id, expected version, domain, channel, changes maxlen, has client ('1'/'0'), has user,
--       has group
local cur, refusal = current_at(KEYS[3], ARGV[2])
if not cur then
  return refusal
end
local v = log_change(KEYS[1], KEYS[2], ARGV[5], 'deleted', ARGV[1], ARGV[3], '')
redis.call('DEL', KEYS[3])
if redis.call('GET', KEYS[4]) == ARGV[1] then
  redis.call('DEL', KEYS[4])
end
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('DEL', KEYS[7])
local k = 8
if ARGV[6] == '1' then
  redis.call('ZREM', KEYS[k], ARGV[1])
  k = k + 1
end
if ARGV[7] == '1' then
  redis.call('ZREM', KEYS[k], ARGV[1])
  k = k + 1
end
if ARGV[8] == '1' then
  redis.call('ZREM', KEYS[k], ARGV[1])
end
publish(ARGV[4], 'deleted', v, ARGV[1], ARGV[3], '')
return {'ok', v, EPOCH}
