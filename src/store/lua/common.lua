-- Shared by every mutation script (prepended to each): bump the store version, append the
-- change to the capped log under stream id 0-<version>, publish the event.
--
-- The store epoch: every mutation script gets the epoch key as its LAST key and, as its last
-- three arguments, a fresh epoch id, then the epoch and version its client last saw. The epoch
-- is created when absent (a flushed or emptied store) and replaced when the client proves the
-- history went backwards (it saw a version at this epoch that the store no longer reaches).
local EPOCH = nil
-- Set by a restore that skips versions: the version its change follows (log field 'a').
local AFTER = nil

local function ensure_epoch(next_version)
  local key = KEYS[#KEYS]
  local epoch = redis.call('GET', key)
  local seen_epoch, seen_version = ARGV[#ARGV - 1], tonumber(ARGV[#ARGV]) or 0
  if (not epoch) or (epoch == seen_epoch and next_version <= seen_version) then
    epoch = ARGV[#ARGV - 2]
    redis.call('SET', key, epoch)
  end
  return epoch
end

-- The log entry is written first: if it cannot be, the script fails having written nothing.
local function log_change(version_key, changes_key, maxlen, op, id, domain, prev)
  local v = tonumber(redis.call('GET', version_key) or '0') + 1
  EPOCH = ensure_epoch(v)
  local fields = {'v', v, 'op', op, 'id', id, 'domain', domain, 'e', EPOCH}
  if prev ~= '' then
    fields[#fields + 1] = 'prev'
    fields[#fields + 1] = prev
  end
  if AFTER then
    fields[#fields + 1] = 'a'
    fields[#fields + 1] = AFTER
  end
  local added = redis.pcall('XADD', changes_key, 'MAXLEN', '~', maxlen, string.format('0-%d', v), unpack(fields))
  if type(added) == 'table' and added.err then
    -- The counter fell behind the log (its key alone was lost): continue after the log.
    local ok, info = pcall(redis.call, 'XINFO', 'STREAM', changes_key)
    if not ok then
      error({err = 'tunnox: cannot append to ' .. changes_key .. ': ' .. added.err})
    end
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then
        v = (tonumber(string.match(info[i + 1], '^0%-(%d+)$')) or v) + 1
      end
    end
    fields[2] = v
    if AFTER then -- continuing after the log: nothing is skipped
      AFTER = nil
      fields[#fields] = nil
      fields[#fields] = nil
    end
    added = redis.pcall('XADD', changes_key, 'MAXLEN', '~', maxlen, string.format('0-%d', v), unpack(fields))
    if type(added) == 'table' and added.err then
      error({err = 'tunnox: cannot append to ' .. changes_key .. ': ' .. added.err})
    end
  end
  redis.call('SET', version_key, v)
  return v
end

local function with_version(json, v)
  return string.sub(json, 1, -2) .. ',"version":' .. string.format('%d', v) .. '}'
end

local function publish(channel, op, v, id, domain, prev)
  local event = {type = op, version = v, mapping_id = id, full_domain = domain, epoch = EPOCH}
  if prev ~= '' then event.previous_domain = prev end
  if AFTER then event.after = AFTER end
  redis.call('PUBLISH', channel, cjson.encode(event))
end

-- The current record if it exists at the expected version; otherwise nil and the reply to give.
local function current_at(record_key, expected)
  local cur = redis.call('GET', record_key)
  if not cur then
    return nil, {'missing'}
  end
  local curv = cjson.decode(cur).version or 0
  if curv ~= tonumber(expected) then
    return nil, {'stale', curv}
  end
  return cur, nil
end
