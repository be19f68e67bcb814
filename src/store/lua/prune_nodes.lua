-- Removes ids from the node index whose registration hash has expired. Checked here rather
-- than by the reader, so a node re-registering meanwhile is never dropped from the index.
-- KEYS: the node index, then one node hash per id. ARGV: the ids, in the same order.
local removed = 0
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    removed = removed + redis.call('SREM', KEYS[1], ARGV[i])
  end
end
return removed
