-- Becomes a stream's writer, fencing the one before: only if the record
-- still holds the epoch the caller last saw (nobody took over meanwhile).
-- KEYS[1]: the writer record. ARGV[1]: the epoch seen ('' when there was no
-- record); ARGV[2]: this process's member name.
-- The new epoch is above every earlier one, even one a lost record held (it
-- is at least the server time in ms times 1024).
-- Returns {1, epoch, position} when taken, {0, epoch, owner, position} when
-- another was quicker.
local rec = redis.call('HMGET', KEYS[1], 'epoch', 'owner', 'pos')
if (rec[1] or '') ~= ARGV[1] then
  return {0, rec[1] or false, rec[2] or false, rec[3] or false}
end
local epoch = int(math.max((tonumber(rec[1]) or 0) + 1, now_ms() * 1024))
redis.call('HSET', KEYS[1], 'epoch', epoch, 'owner', ARGV[2])
return {1, epoch, rec[3] or false}
