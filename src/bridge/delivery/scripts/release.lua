-- A writer stepping down (stopping, or after a gap it cannot fill): the
-- record keeps its epoch and position, without an owner, so that another
-- process takes over at once.
-- KEYS[1]: the writer record. ARGV[1]: the writer's epoch.
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'owner', '')
  return 1
end
return 0
