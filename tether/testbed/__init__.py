"""Network-emulated testbed: trace-driven links, a throttled edge, scenarios, plots.

Modules:
    link       userspace trace-driven TCP relay (mahimahi semantics, delay, loss, outages)
    tracespec  trace specs on the command line / in scenarios -> trace objects
    calibrate  bulk-transfer calibration of a link against its trace
    platform   probes (root, kernel, tc, netem, cgroups) and the edge CPU throttle
    kernel     netns + veth + tbf backend where root is available
    scenario   the scenario TOML schema
    runner     starts cloud, links and edges as processes and collects their records
    analysis   per-request CSV, summary table, oracle regret, simulator comparison
    plots      latency CDF, actions and bandwidth over time, accuracy vs latency
"""
