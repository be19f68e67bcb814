-- KEYS: version, changes, record, old domain claim, new domain claim, expiry index,
--       [old client index], [new client index], [old user index], [new user index],
--       [old group index], [new group index]
-- ARGV: id, expected version, record json (no version), new domain, old domain, channel,
--       changes maxlen, expires ms or '', index flags (6 chars '0'/'1': old client, new client,
--       old user, new user, old group, new group)
local cur, refusal = current_at(KEYS[3], ARGV[2])
if not cur then
  return refusal
end
local moved = ARGV[4] ~= ARGV[5]
if moved then
  local holder = redis.call('GET', KEYS[5])
  if holder and holder ~= ARGV[1] then
    return {'taken', holder}
  end
end
local prev = ''
if moved then prev = ARGV[5] end
local v = log_change(KEYS[1], KEYS[2], ARGV[7], 'updated', ARGV[1], ARGV[4], prev)
redis.call('SET', KEYS[3], with_version(ARGV[3], v))
if moved then
  if redis.call('GET', KEYS[4]) == ARGV[1] then
    redis.call('DEL', KEYS[4])
  end
  redis.call('SET', KEYS[5], ARGV[1])
end
if ARGV[8] ~= '' then
  redis.call('ZADD', KEYS[6], ARGV[8], ARGV[1])
else
  redis.call('ZREM', KEYS[6], ARGV[1])
end
local k = 7
local flags = ARGV[9]
for i = 1, #flags do
  if string.sub(flags, i, i) == '1' then
    if i % 2 == 1 then
      redis.call('ZREM', KEYS[k], ARGV[1])
    else
      redis.call('ZADD', KEYS[k], 0, ARGV[1])
    end
    k = k + 1
  end
end
publish(ARGV[6], 'updated', v, ARGV[1], ARGV[4], prev)
return {'ok', v, EPOCH}
