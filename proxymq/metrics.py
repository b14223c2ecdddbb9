"""What the gateway's and the workers' metrics share: latency buckets, so a dashboard can
put the gateway's request time next to the worker's queue wait and downstream time."""

# Seconds, from 1 ms to PROXYMQ_REPLY_TIMEOUT's default (120 s).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)
