-- A mark alone: the reader's first item on a new subscription (run inside
-- the MULTI that subscribes), and a stopping reader's last.
-- KEYS[1]: the clock. ARGV[1]: the marks channel. Returns the mark.
return next_mark(1, ARGV[1])
