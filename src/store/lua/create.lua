-- KEYS: version, changes, domain claim, record, all index, expiry index, [client index],
--       [user index], [group index], [rebuilt marker: a restore only]
-- ARGV: id, record json (no version), domain, channel, changes maxlen, expires ms or '',
--       has client ('1'/'0'), has user ('1'/'0'), has group ('1'/'0'), group quota, owner quota
--       (0 = unlimited), record key prefix (`<prefix>:mapping:`), version to restore at
--       ('' = the next one)
local holder = redis.call('GET', KEYS[3])
if holder then
  return {'taken', holder}
end
local k = 7
local client_key, user_key, group_key
if ARGV[7] == '1' then client_key = KEYS[k]; k = k + 1 end
if ARGV[8] == '1' then user_key = KEYS[k]; k = k + 1 end
if ARGV[9] == '1' then group_key = KEYS[k] end

-- Quotas are counted here, in the script that claims, so concurrent creators cannot exceed
-- them. An index that looks full is first cleared of ids whose record is gone (eviction, a
-- hand edit), so a lost record does not hold a quota slot forever: up to 128 ids at random
-- per refused create, so a large quota costs a bounded check. The record keys are built from
-- ARGV[12], which shares the prefix (and so its hash tag in cluster mode), as in lookup.lua.
-- Returns the count when full.
local function full(index, limit)
  limit = tonumber(limit)
  if limit == 0 then return nil end
  local n = redis.call('ZCARD', index)
  if n < limit then return nil end
  for _, id in ipairs(redis.call('ZRANDMEMBER', index, 128)) do
    if redis.call('EXISTS', ARGV[12] .. id) == 0 then
      redis.call('ZREM', index, id)
      n = n - 1
    end
  end
  if n < limit then return nil end
  return n
end
if group_key then
  local n = full(group_key, ARGV[10])
  if n then return {'quota', 'group', n} end
end
if user_key then
  local n = full(user_key, ARGV[11])
  if n then return {'quota', 'owner', n} end
end

-- A restore (a record the store lost, written again at the version its resource's status
-- names): only into a history being rebuilt (no marker of the controller at this epoch: a
-- history marked complete that lacks records lost writes, and only a new epoch says so),
-- only with an id nothing refers to, only ahead of the store (of its counter and of its log),
-- and only below 2^52 (exact as a Lua number, printed with %d).
if ARGV[13] ~= '' then
  local want = tonumber(ARGV[13])
  local now = tonumber(redis.call('GET', KEYS[1]) or '0')
  local ok, info = pcall(redis.call, 'XINFO', 'STREAM', KEYS[2])
  if ok then
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then
        local last = tonumber(string.match(info[i + 1], '^0%-(%d+)$')) or 0
        if last > now then now = last end
      end
    end
  end
  local existing = redis.call('GET', KEYS[4])
  if existing then
    return {'stale', cjson.decode(existing).version or 0}
  end
  local marked = redis.call('HGET', KEYS[#KEYS - 1], 'epoch')
  if (not want) or want <= now or want > 4503599627370496
      or redis.call('ZSCORE', KEYS[5], ARGV[1])
      or (marked and marked == redis.call('GET', KEYS[#KEYS])) then
    return {'stale', now}
  end
  if want > now + 1 then
    AFTER = now
  end
  redis.call('SET', KEYS[1], want - 1)
end
local v = log_change(KEYS[1], KEYS[2], ARGV[5], 'created', ARGV[1], ARGV[3], '')
redis.call('SET', KEYS[3], ARGV[1])
redis.call('SET', KEYS[4], with_version(ARGV[2], v))
redis.call('ZADD', KEYS[5], 0, ARGV[1])
if ARGV[6] ~= '' then
  redis.call('ZADD', KEYS[6], ARGV[6], ARGV[1])
end
for _, index in ipairs({client_key or false, user_key or false, group_key or false}) do
  if index then redis.call('ZADD', index, 0, ARGV[1]) end
end
publish(ARGV[4], 'created', v, ARGV[1], ARGV[3], '')
return {'ok', v, EPOCH}
