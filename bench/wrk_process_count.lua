-- wrk -s bench/wrk_process_count.lua: as wrk_process.lua, and at the end one line
-- "statuses: {200=N, 503=M, ...}" counting every answer by HTTP status (a Lua call an answer:
-- for long runs that must say what the non-2xx were, not for peak throughput).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("BODY") or '{"message":"hello world","op":"reverse"}'

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  counts = {}
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("counts")) do
      total[status] = (total[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(total) do
    table.insert(parts, status .. "=" .. n)
  end
  table.sort(parts)
  io.write("statuses: {" .. table.concat(parts, ", ") .. "}\n")
end
