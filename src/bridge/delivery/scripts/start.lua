-- A reader's first mark, run inside the MULTI that subscribes: the mark,
-- and the seal its marks are checked with (see `sealed`).
-- KEYS[1]: the clock. ARGV[1]: the marks channel; ARGV[2]: '1' to publish
-- it with SPUBLISH (sharded Pub/Sub on a cluster).
-- Returns "<mark>:<seal>:<the value the clock last leapt to>" (see
-- `next_mark`).
local mark, leapt = next_mark(1, ARGV[1], ARGV[2])
return int(mark) .. ':' .. seal() .. ':' .. int(leapt)
