-- wrk -s bench/wrk_process.lua: POST /process with the 256-byte message bench text sends
-- (the body is set by check_vs_wrk.py through the BODY environment variable).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("BODY") or '{"message":"hello world","op":"reverse"}'
