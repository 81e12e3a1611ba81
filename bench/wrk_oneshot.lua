-- wrk -s bench/wrk_oneshot.lua URL/audio/stream?format=binary: one whole upload a request
-- (the body is the file named by BODY_FILE, e.g. 1 s of 16 kHz s16le = 32,000 bytes).
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.headers["Content-Type"] = "audio/L16;rate=16000"
wrk.body = f:read("*a")
f:close()
