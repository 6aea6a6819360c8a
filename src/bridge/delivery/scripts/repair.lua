-- Puts right a writer record whose position no mark of the pool can have
-- made (past the mark of the cycle that read it, or no position at all:
-- written by hand, or by a process that took a forged mark for one). The
-- caller judged it; this only sets it, and only while the record still
-- holds what was judged (a writer moving it on makes it possible again).
-- KEYS[1]: the writer record. ARGV[1]: the position found; ARGV[2]: the
-- position to put there.
-- Returns 1 when put right, 0 when the record holds another position now.
if redis.call('HGET', KEYS[1], 'pos') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'pos', ARGV[2])
return 1
