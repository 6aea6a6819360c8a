-- Puts right a writer record whose position no mark of the pool can have
-- made (past the clock, or not a position at all: written by hand, or by
-- a process that took a forged mark for one). Only while the record still
-- holds that position, and only when it is past the clock.
-- KEYS[1]: the writer record, KEYS[2]: the clock. ARGV[1]: the position
-- found; ARGV[2]: the position to put there.
-- Returns 1 when put right, 0 when the record holds another position now.
local pos = redis.call('HGET', KEYS[1], 'pos')
if pos ~= ARGV[1] then
  return 0
end
local mark = tonumber(string.match(pos, '^(%d+):%d+$') or '')
if mark and mark <= (tonumber(redis.call('GET', KEYS[2])) or 0) then
  return 0
end
redis.call('HSET', KEYS[1], 'pos', ARGV[2])
return 1
