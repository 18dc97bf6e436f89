wrk.method = "POST"
wrk.body = '{"model": "Qwen3-0.6B", "messages": [{"role": "user", "content": "Say hello to the benchmark."}], "max_tokens": 8, "stream": true}'
wrk.headers["Content-Type"] = "application/json"
