-- The controller's "rebuilt at epoch E" marker, written only if the store is still at epoch E
-- (a flush during the resync pass must not be marked as rebuilt).
-- KEYS: epoch, marker. ARGV: epoch, version, at (RFC 3339), by.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[2], 'epoch', ARGV[1], 'version', ARGV[2], 'at', ARGV[3], 'by', ARGV[4])
return 1
