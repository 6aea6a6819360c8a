-- The fenced write: a batch of one stream's messages, in their order, by its
-- writer; nothing when the writer was fenced or when the record is not
-- where the batch starts.
-- KEYS[1]: the writer record, KEYS[2]: the stream, KEYS[3]: its dead-letter
-- stream. ARGV[1]: the writer's epoch; ARGV[2]: the position the record must
-- hold ('' for none); ARGV[3]: the position after the whole batch; ARGV[4]:
-- the writer's member name (an epoch taken in the same millisecond as one a
-- lost record held can be equal to it; the owner tells them apart);
-- ARGV[5..7]: the cap (see xadd_for); then per message: its position, its
-- target (0: none, only passed over; 1: the stream; 2: the dead-letter
-- stream), the field count n, n values.
-- Returns {0, epoch, position}: fenced, nothing written; {1, position}: the
-- record is elsewhere, nothing written; {2, n}: all n written, the record
-- at ARGV[3]; {3, n, reason}: the first n written, then a refusal that
-- passes; {4, n, reason}: the first n written, then the stream refused the
-- next one for good. The record's position is that of the last message
-- written: nothing is recorded that was not written.
local rec = redis.call('HMGET', KEYS[1], 'epoch', 'owner', 'pos')
if rec[1] ~= ARGV[1] or rec[2] ~= ARGV[4] then
  return {0, rec[1] or false, rec[3] or false}
end
if (rec[3] or '') ~= ARGV[2] then
  return {1, rec[3] or false}
end
local xadd = xadd_for(5, 2, 3)
local a = 8
local done = 0
local last = ARGV[2]
while a <= #ARGV do
  local pos, target, n = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if target ~= 0 then
    local reason, passes = try_xadd(xadd, target, a + 3, a + 2 + n)
    if reason then
      if last ~= '' then
        redis.call('HSET', KEYS[1], 'pos', last)
      end
      if passes then
        return {3, done, reason}
      end
      return {4, done, reason}
    end
  end
  done = done + 1
  last = pos
  a = a + 3 + n
end
redis.call('HSET', KEYS[1], 'pos', ARGV[3])
return {2, done}
