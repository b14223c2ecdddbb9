-- wrk script for the benchmark: every request is a POST with a ~100-byte JSON body.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"id": 12345, "text": "the quick brown fox jumps over the lazy dog", "pad": "xxxxxxxxxxxxxxxxxx"}'
