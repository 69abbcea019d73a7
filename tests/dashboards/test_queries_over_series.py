"""Panel queries evaluated exactly over synthetic series (promtool): their tails and edges.

A live Prometheus sees an edge only when a scrape happens to fall on it; ``promtool test rules``
evaluates PromQL over chosen samples at chosen times, so these tests pin what a panel reads right
after a burst, while idle, and on series born between two scrapes. 15 s scrapes, the rate interval
rendered as 1 m (Grafana's ``$__rate_interval`` for them).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from dashboards.queries import iter_panels, render_for_prometheus
from sidecar.receiver import grpc_server, refusals
from sidecar.telemetry import Telemetry
from tests.dashboards.tooling import load_dashboard, promql_mismatches

TARGET = 'job="pathwatch",instance="pod-a:9464"'
EMITTED = f'pathwatch_events_emitted_total{{event_type="agent_started",{TARGET}}}'
UNDELIVERED = ('pathwatch_events_undelivered_total{event_type="agent_started",reason="no_connection",'
               f'{TARGET}}}')
BUILD_INFO = f'pathwatch_build_info{{service_version="test",{TARGET}}}'
UNDELIVERED_RATIO = "Undelivered ratio by event type"
AGENT_STARTED = '{event_type="agent_started"}'


def panel_query(dashboard: str, title: str, ref_id: str = "A") -> str:
    """The query ``ref_id`` (A, B ... in the panel's order) of a panel."""
    [expr] = [t["expr"] for p in iter_panels(load_dashboard(dashboard)) if p["title"] == title
              for t in p["targets"] if t["refId"] == ref_id]
    return expr


def created(total: str) -> str:
    return total.replace("_total{", "_created{", 1)


def rounded(expr: str) -> str:
    """Rates over extrapolated windows are not exact: compare to 1e-4 (+Inf stays +Inf)."""
    return f"round({render_for_prometheus(expr, rate_interval='1m')}, 0.0001)"


# An event is counted undelivered a deadline plus allowance (8 s by default) after its emit is
# counted, so a scrape can fall between the two: the undelivered ones stay in the rate window a
# scrape longer than the emits. name: (series, times 1 of 10 is undelivered, the tail's times)
# (sample i is at i * 15 s: 41 is 10m15s)
UNDELIVERED_TAILS = {
    # old series: 10 emits counted by the 10m15s scrape, 1 of them undelivered by the 10m30s one
    "a burst on old series": (
        [(EMITTED, "100x40 110x40"), (created(EMITTED), "0x80"),
         (UNDELIVERED, "5x41 6x39"), (created(UNDELIVERED), "0x80"), (BUILD_INFO, "1x80")],
        ("10m30s", "10m45s", "11m"), ("11m5s", "11m15s")),
    # the clean-clone CI's case: an event type's first 10 emits (series born at 10m, scraped at
    # 10m15s) and its first undelivered one (born 8 s later, scraped at 10m30s)
    "the first burst, its series born a scrape apart": (
        [(EMITTED, "_x41 10x39"), (created(EMITTED), "_x41 600x39"),
         (UNDELIVERED, "_x42 1x38"), (created(UNDELIVERED), "_x42 608x38"), (BUILD_INFO, "1x80")],
        ("10m30s", "10m45s"), ("11m", "11m5s")),
}


def test_the_undelivered_ratio_reads_0_not_inf_once_a_bursts_emits_left_the_window(
        tmp_path) -> None:
    # 1 of 10 undelivered while both are in the window; then, for a scrape, only the undelivered one
    # is: undelivered / 0 read +Inf (before 572b107), the stat's last value, red. 0 from then on.
    expr = rounded(panel_query("pathwatch-delivery.json", UNDELIVERED_RATIO))
    for name, (series, busy, tail) in UNDELIVERED_TAILS.items():
        checks = [(expr, t, {AGENT_STARTED: 0.1}) for t in busy]
        checks += [(expr, t, {AGENT_STARTED: 0.0}) for t in (*tail, "11m30s", "12m", "19m")]
        assert promql_mismatches(tmp_path, series, checks) == "", name


def test_the_undelivered_tail_series_do_reach_undelivered_over_nothing_emitted(tmp_path) -> None:
    # guards the guard: without the `> 0` on the emitted side (the query before 572b107) the same
    # series read +Inf at the tail, so the test above does see the edge
    expr = panel_query("pathwatch-delivery.json", UNDELIVERED_RATIO)
    unguarded = (expr.replace(" / on (event_type) (sum by (event_type) (",
                              " / on (event_type) sum by (event_type) (")
                 .replace(")) > 0) or on (event_type)", ")) or on (event_type)"))
    assert unguarded.count("> 0") == expr.count("> 0") - 1, unguarded
    for name, (series, _, tail) in UNDELIVERED_TAILS.items():
        checks = [(rounded(unguarded), t, {AGENT_STARTED: float("inf")}) for t in tail]
        assert promql_mismatches(tmp_path, series, checks) == "", name


def test_the_undelivered_ratio_is_per_event_type_as_the_alert_fires(tmp_path) -> None:
    # PathwatchUndeliveredEventsHigh fires per event type: 1 of 10 agent_started events undelivered
    # is 10 % and fires, while 90 clean agent_finished events made the panel's one ratio over every
    # type read 1 of 100, 1 %, not above the alert's 1 % mark and not saying which type
    finished = EMITTED.replace("agent_started", "agent_finished")
    series = [(EMITTED, "100x40 110x40"), (created(EMITTED), "0x80"),
              (finished, "900x40 990x40"), (created(finished), "0x80"),
              (UNDELIVERED, "5x41 6x39"), (created(UNDELIVERED), "0x80"), (BUILD_INFO, "1x80")]
    expr = rounded(panel_query("pathwatch-delivery.json", UNDELIVERED_RATIO))
    both = {AGENT_STARTED: 0.1, '{event_type="agent_finished"}': 0.0}
    checks = [(expr, t, both) for t in ("10m30s", "10m45s", "11m")]
    assert promql_mismatches(tmp_path, series, checks) == ""


def receiver_series(target: str, first_scrape: int) -> list[tuple[str, str]]:
    """A new pod's receiver counters: declared at 0 at its start (10m, `_created` 600), first scraped
    at sample ``first_scrape``, by when its start-up surge was counted: 40 spans refused (the memory
    limiter full) and 3 requests refused 413; then only accepted spans, 50 a scrape."""
    before = f"_x{first_scrape}"
    after = 80 - first_scrape
    series = []
    for name, label, values in (
            ("pathwatch_receiver_spans", 'outcome="accepted"', f"500+50x{after - 1}"),
            ("pathwatch_receiver_spans", 'outcome="refused"', f"40x{after - 1}"),
            ("pathwatch_receiver_spans", 'outcome="invalid"', f"0x{after - 1}"),
            ("pathwatch_receiver_spans", 'outcome="replayed"', f"0x{after - 1}"),
            ("pathwatch_receiver_requests", 'status="200"', f"10+1x{after - 1}"),
            ("pathwatch_receiver_requests", 'status="413"', f"3x{after - 1}"),
            ("pathwatch_receiver_requests", 'status="400"', f"0x{after - 1}")):
        labels = f'{{protocol="http",{label},{target}}}'
        series += [(f"{name}_total{labels}", f"{before} {values}"),
                   (f"{name}_created{labels}", f"{before} 600x{after - 1}")]
    return series


def test_a_new_pods_receiver_refusals_before_its_first_scrape_show(tmp_path) -> None:
    # its series are at 0 from its start, but Prometheus's first scrape of a new pod comes when it
    # comes: the start-up surge's refusals were in the first sample, which rate() alone never saw
    # (0 refused, 0 rejected, for ever). Counted from the series' `_created`, as every other counter.
    series = receiver_series('job="pathwatch",instance="pod-b:9464"', first_scrape=42)  # 10m30s
    spans = rounded(panel_query("pathwatch-delivery.json", "Receiver spans by outcome"))
    requests = rounded(panel_query("pathwatch-delivery.json", "Export requests rejected"))
    outcome = '{{outcome="{}", protocol="http"}}'.format
    status = '{{protocol="http", status="{}"}}'.format
    checks = [
        (spans, "10m45s", {outcome("accepted"): 9.1667, outcome("refused"): 0.6667,  # 550, 40 / 60 s
                           outcome("invalid"): 0.0, outcome("replayed"): 0.0}),
        (requests, "10m45s", {status("413"): 0.05, status("400"): 0.0}),
        # the pod older than the window: rate() of what moved in it
        (spans, "12m", {outcome("accepted"): 3.3333, outcome("refused"): 0.0,
                        outcome("invalid"): 0.0, outcome("replayed"): 0.0}),
        (requests, "12m", {status("413"): 0.0, status("400"): 0.0})]
    assert promql_mismatches(tmp_path, series, checks) == ""


def test_the_receiver_panel_shows_the_requests_the_alert_reads_beside_the_spans(tmp_path) -> None:
    # PathwatchSidecarRefusingSpans fires on refused or invalid spans and on requests the exporter
    # drops whole (INVALID_ARGUMENT / 400, 413, 415), but the spans panel showed only the spans: the
    # requests beside them, a new pod's start-up 413s first scraped at 3 too (per_second()), 0 per
    # protocol that has dropped none (gRPC: OK only), and no line for requests answered OK / 200
    series = [*receiver_series('job="pathwatch",instance="pod-b:9464"', first_scrape=42),
              ('pathwatch_receiver_requests_total{protocol="grpc",status="OK",job="pathwatch",'
               'instance="pod-a:9464"}', "100+10x79"),
              ('pathwatch_receiver_requests_created{protocol="grpc",status="OK",job="pathwatch",'
               'instance="pod-a:9464"}', "0x80")]
    dropped = rounded(panel_query("pathwatch-delivery.json", "Receiver spans by outcome", "B"))
    status = '{{protocol="http", status="{}"}}'.format
    grpc = '{protocol="grpc"}'
    checks = [(dropped, "9m45s", {grpc: 0.0}),
              (dropped, "10m45s", {status("413"): 0.05, status("400"): 0.0, grpc: 0.0}),  # 3 / 60 s
              (dropped, "12m", {status("413"): 0.0, status("400"): 0.0, grpc: 0.0})]
    assert promql_mismatches(tmp_path, series, checks) == ""


def vanished_series(service: str, instance: str, values: str, created_s: str) -> list[tuple[str, str]]:
    labels = f'{{service_name="{service}",job="pathwatch",instance="{instance}"}}'
    return [(f"pathwatch_backend_processes_vanished_total{labels}", values),
            (f"pathwatch_backend_processes_vanished_created{labels}", created_s)]


# (sample i is at i * 15 s: 40 is 10m)
VANISHED_SERIES = [
    # a sidecar up for long: "api"'s series at 0 from its first heartbeat, a process killed at 10m
    *vanished_series("api", "pod-a:9464", "0x39 1x40", "0x80"),
    # "worker" heartbeats, none of its processes vanished
    *vanished_series("worker", "pod-a:9464", "0x80", "0x80"),
    # a new sidecar (10m): it heard a "billing" process, which was killed and judged gone before
    # Prometheus's first scrape of the pod (10m30s): the series' first sample is already 1
    *vanished_series("billing", "pod-b:9464", "_x42 1x38", "_x42 600x38"),
]


def test_backend_processes_vanished_shows_a_vanish_0_while_none_and_a_series_born_at_1(
        tmp_path) -> None:
    # the sidecar's count of backend processes killed outright (span loss process_vanished) was on
    # no dashboard. A service that heartbeats reads 0, a vanish shows for an interval, and so does
    # one that happened before a new sidecar's first scrape (rate() alone read 0 for it, for ever)
    expr = rounded(panel_query("pathwatch-delivery.json", "Backend processes vanished"))
    service = '{{service_name="{}"}}'.format
    checks = [
        (expr, "9m45s", {service("api"): 0.0, service("worker"): 0.0}),
        (expr, "10m15s", {service("api"): 0.0167, service("worker"): 0.0}),  # 1 / 60 s
        # "billing" born at 1 within the window: its whole value over the window
        (expr, "10m45s", {service("api"): 0.0167, service("worker"): 0.0,
                          service("billing"): 0.0167}),
        (expr, "12m", {service("api"): 0.0, service("worker"): 0.0, service("billing"): 0.0})]
    assert promql_mismatches(tmp_path, VANISHED_SERIES, checks) == ""


def test_the_vanished_series_born_at_1_does_read_0_under_rate_alone(tmp_path) -> None:
    # guards the guard: the same series under plain rate() miss the new sidecar's first vanish
    plain = rounded("sum by (service_name) "
                    "(rate(pathwatch_backend_processes_vanished_total[$__rate_interval]))")
    assert promql_mismatches(tmp_path, VANISHED_SERIES, [
        (plain, "10m45s", {'{service_name="api"}': 0.0167, '{service_name="worker"}': 0.0,
                           '{service_name="billing"}': 0.0})]) == ""


def counter_series(name: str, labels: str, instance: str, values: str,
                   created_s: str) -> list[tuple[str, str]]:
    selector = f'{{{labels},job="pathwatch",instance="{instance}"}}'
    return [(f"{name}_total{selector}", values), (f"{name}_created{selector}", created_s)]


# Series born at their first count (sample i is at i * 15 s: 40 is 10m): one born at 150 s at 2 that
# rises by 1 at 10m, and one of a new sidecar (pod-b, 10m) whose first count came before
# Prometheus's first scrape of it (10m30s): its first sample is already 1. Nothing before 150 s.
BORN_AT_FIRST_COUNT = {
    "Detector evidence dropped": (
        "pathwatch_detector_evidence_dropped", "detector", "reason",
        ('detector="bleed",reason="trace_users"', 'detector="delivery",reason="late_export"')),
    "Span attributes ignored": (
        "pathwatch_receiver_invalid_attributes", "attribute", None,
        ('attribute="pathwatch.run.id"', 'attribute="pathwatch.event.type"')),
}


def test_counters_born_at_their_first_count_show_it_and_read_0_while_none(tmp_path) -> None:
    # evidence a detector let go (PathwatchDetectorEvidenceDropped) and span attributes the receiver
    # ignored (PathwatchSpanAttributesInvalid) were on no panel. Their series are born at their first
    # count: one first scraped at 1 shows (rate() alone read 0 for it), and none yet reads 0
    for title, (name, *_, (old, new)) in BORN_AT_FIRST_COUNT.items():
        series = [(BUILD_INFO, "1x80"),
                  *counter_series(name, old, "pod-a:9464", "_x10 2x29 3x40", "_x10 150x69"),
                  *counter_series(name, new, "pod-b:9464", "_x42 1x38", "_x42 608x38")]
        expr = rounded(panel_query("pathwatch-delivery.json", title))
        old_key, new_key = "{%s}" % old, "{%s}" % new
        checks = [(expr, "1m", {"{}": 0.0}),
                  (expr, "9m45s", {old_key: 0.0}),
                  (expr, "10m15s", {old_key: 0.0167}),  # 1 / 60 s
                  (expr, "10m45s", {old_key: 0.0167, new_key: 0.0167}),
                  (expr, "12m", {old_key: 0.0, new_key: 0.0})]
        assert promql_mismatches(tmp_path, series, checks) == "", title


# Why the receivers refused (pathwatch_receiver_refused_requests_total, on no panel before): every
# reason a receiver refuses for has its series at 0 from its start (sidecar/receiver/refusals.py,
# declare(): gRPC four, OTLP/HTTP all six). pod-a, up since 0 s: gRPC refuses 3 requests over budget
# at 10m. pod-b, a new pod (10m) whose start-up surge had 5 OTLP/HTTP requests refused over budget
# and one too large before Prometheus's first scrape of it (10m30s): those series' first samples.
GRPC_REASONS, HTTP_REASONS = grpc_server.REASONS, refusals.REASONS  # what each one declares
POD_B_SURGE = {"over_budget": 5, "too_large": 1}


def refusal_series() -> list[tuple[str, str]]:
    series = []
    for protocol, reasons in (("grpc", GRPC_REASONS), ("http", HTTP_REASONS)):
        for reason in reasons:
            labels = f'protocol="{protocol}",reason="{reason}"'
            pod_a = "0x39 3x40" if (protocol, reason) == ("grpc", "over_budget") else "0x80"
            series += counter_series("pathwatch_receiver_refused_requests", labels, "pod-a:9464",
                                     pod_a, "0x80")
            if protocol == "http":
                series += counter_series("pathwatch_receiver_refused_requests", labels,
                                         "pod-b:9464", f"_x42 {POD_B_SURGE.get(reason, 0)}x38",
                                         "_x42 600x38")
    return series


def test_refusals_by_reason_show_per_protocol_0_while_none_and_a_new_pods_surge(tmp_path) -> None:
    expr = rounded(panel_query("pathwatch-delivery.json", "Export requests refused by reason"))
    key = '{{protocol="{}",reason="{}"}}'.format
    quiet = {**{key("grpc", r): 0.0 for r in GRPC_REASONS}, **{key("http", r): 0.0 for r in HTTP_REASONS}}
    checks = [(expr, "1m", quiet),
              (expr, "9m45s", quiet),
              (expr, "10m15s", {**quiet, key("grpc", "over_budget"): 0.05}),  # 3 / 60 s
              (expr, "10m45s", {**quiet, key("grpc", "over_budget"): 0.05,
                                key("http", "over_budget"): 0.0833,  # 5 / 60 s, first scraped at 5
                                key("http", "too_large"): 0.0167}),
              (expr, "12m", quiet)]
    assert promql_mismatches(tmp_path, refusal_series(), checks) == ""


def test_the_new_pods_surge_does_read_0_under_rate_alone(tmp_path) -> None:
    # guards the guard: plain rate() of the same series misses pod-b's surge, for ever
    plain = rounded("sum by (protocol, reason) "
                    "(rate(pathwatch_receiver_refused_requests_total[$__rate_interval]))")
    key = '{{protocol="{}",reason="{}"}}'.format
    expected = {**{key("grpc", r): 0.0 for r in GRPC_REASONS},
                **{key("http", r): 0.0 for r in HTTP_REASONS}, key("grpc", "over_budget"): 0.05}
    assert promql_mismatches(tmp_path, refusal_series(), [(plain, "10m45s", expected)]) == ""


# Liveness failures: every (part, reason) series exists at 0 from the sidecar's start (pod-a up
# since 0 s); the pipeline stalls at 10m, and pod-a's sidecar is restarted in place at 15m (the same
# series back at 0, created anew). A new sidecar (pod-b, started at 10m) whose gRPC receiver thread
# ended at start-up, before Prometheus's first scrape of it (10m30s): that series' first sample is 1.
LIVENESS = "pathwatch_liveness_failures"
LIVENESS_SERIES = [
    *counter_series(LIVENESS, 'part="pipeline",reason="stalled"', "pod-a:9464",
                    "0x39 1x20 0x20", "0x60 900x20"),
    *counter_series(LIVENESS, 'part="api",reason="ended"', "pod-a:9464", "0x80", "0x60 900x20"),
    *counter_series(LIVENESS, 'part="otlp_grpc",reason="ended"', "pod-b:9464",
                    "_x42 1x38", "_x42 600x38"),
]


def test_sidecar_liveness_failures_show_a_failure_0_per_part_and_a_series_first_scraped_at_1(
        tmp_path) -> None:
    # pathwatch_liveness_failures_total (PathwatchSidecarUnhealthy) was on no panel
    expr = rounded(panel_query("pathwatch-delivery.json", "Sidecar liveness failures"))
    stalled, api = '{part="pipeline",reason="stalled"}', '{part="api",reason="ended"}'
    grpc = '{part="otlp_grpc",reason="ended"}'
    checks = [(expr, "9m45s", {stalled: 0.0, api: 0.0}),
              (expr, "10m15s", {stalled: 0.0167, api: 0.0}),
              (expr, "10m45s", {stalled: 0.0167, api: 0.0, grpc: 0.0167}),
              (expr, "12m", {stalled: 0.0, api: 0.0, grpc: 0.0}),
              # the restart in place: back at 0, a reset, no failure
              *[(expr, t, {stalled: 0.0, api: 0.0, grpc: 0.0}) for t in ("15m", "15m15s", "15m45s")]]
    assert promql_mismatches(tmp_path, LIVENESS_SERIES, checks) == ""


def heartbeat_series(service: str, instance: str, totals: dict[str, tuple[str, str]],
                     heartbeats: str) -> list[tuple[str, str]]:
    labels = f'service_name="{service}"'
    series = [(f'pathwatch_backend_last_heartbeat_timestamp_seconds{{{labels},job="pathwatch",'
               f'instance="{instance}"}}', heartbeats)]
    for name, (values, created_s) in totals.items():
        series += counter_series(name, labels, instance, values, created_s)
    return series


ERRORS, FORGOTTEN = ("pathwatch_backend_instrumentation_errors",
                     "pathwatch_backend_pending_emits_evicted")


def test_backend_instrumentation_faults_show_a_rise_not_past_totals_a_new_sidecar_learns(
        tmp_path) -> None:
    # the instrumentation's errors and forgotten emits (PathwatchBackendInstrumentationFaults) were on
    # no panel. Heartbeat totals, read as Backend-dropped spans: "api" (a sidecar up for long) errs 3
    # times at 10m; "billing" is heard first by a new sidecar (10m), whose first scrape (10m30s)
    # holds its past totals, 40 errors and 7 forgotten emits: no fault now, and none shows
    series = [
        *heartbeat_series("api", "pod-a:9464", {ERRORS: ("5x40 8x40", "-3600x80"),
                                                FORGOTTEN: ("0x80", "-3600x80")}, "0+15x80"),
        *heartbeat_series("billing", "pod-b:9464", {ERRORS: ("_x42 40x38", "_x42 600x38"),
                                                    FORGOTTEN: ("_x42 7x38", "_x42 600x38")},
                          "_x42 630+15x38")]
    [panel] = [p for p in iter_panels(load_dashboard("pathwatch-delivery.json"))
               if p["title"] == "Backend instrumentation faults"]
    errors, forgotten = (rounded(t["expr"]) for t in panel["targets"])
    api, billing = '{service_name="api"}', '{service_name="billing"}'
    checks = [(errors, "9m45s", {api: 0.0}), (forgotten, "9m45s", {api: 0.0}),
              (errors, "10m15s", {api: 0.05}), (forgotten, "10m15s", {api: 0.0}),  # 3 / 60 s
              (errors, "10m45s", {api: 0.05, billing: 0.0}),
              (forgotten, "10m45s", {api: 0.0, billing: 0.0}),
              *[(query, t, {api: 0.0, billing: 0.0}) for query in (errors, forgotten)
                for t in ("11m15s", "12m", "19m")]]
    assert promql_mismatches(tmp_path, series, checks) == ""


# Findings the sidecar lost (PathwatchSidecarLosingFindings, on no panel before): every series at 0
# from a sidecar's start (pod-a, up since 0 s): the bleed detector raises at 10m, the full incident
# store refuses 2 findings at 10m; a new sidecar (pod-b, started at 10m) whose pipeline step raised
# and whose incident write failed before Prometheus's first scrape of it (10m30s): first samples 1.
LOST = [
    *counter_series("pathwatch_detector_errors", 'detector="bleed"', "pod-a:9464", "0x39 1x40", "0x80"),
    *counter_series("pathwatch_detector_errors", 'detector="delivery"', "pod-a:9464", "0x80", "0x80"),
    *counter_series("pathwatch_detector_errors", 'detector="pipeline.consume"', "pod-b:9464",
                    "_x42 1x38", "_x42 600x38"),
    ('pathwatch_incidents_refused_total{job="pathwatch",instance="pod-a:9464"}', "0x39 2x40"),
    ('pathwatch_incidents_refused_created{job="pathwatch",instance="pod-a:9464"}', "0x80"),
    ('pathwatch_incident_store_errors_total{job="pathwatch",instance="pod-a:9464"}', "0x80"),
    ('pathwatch_incident_store_errors_created{job="pathwatch",instance="pod-a:9464"}', "0x80"),
    ('pathwatch_incident_store_errors_total{job="pathwatch",instance="pod-b:9464"}', "_x42 1x38"),
    ('pathwatch_incident_store_errors_created{job="pathwatch",instance="pod-b:9464"}', "_x42 600x38"),
]


def test_findings_lost_by_the_sidecar_show_each_problem_0_while_none_and_a_series_first_scraped_at_1(
        tmp_path) -> None:
    title = "Findings lost by the sidecar"
    errors, refused, store = (rounded(panel_query("pathwatch-delivery.json", title, ref))
                              for ref in "ABC")
    bleed, delivery, step = ('{detector="bleed"}', '{detector="delivery"}',
                             '{detector="pipeline.consume"}')
    checks = [(errors, "9m45s", {bleed: 0.0, delivery: 0.0}),
              (errors, "10m15s", {bleed: 0.0167, delivery: 0.0}),  # 1 / 60 s
              (errors, "10m45s", {bleed: 0.0167, delivery: 0.0, step: 0.0167}),
              (errors, "12m", {bleed: 0.0, delivery: 0.0, step: 0.0}),
              (refused, "9m45s", {"{}": 0.0}),
              (refused, "10m15s", {"{}": 0.0333}),
              (refused, "12m", {"{}": 0.0}),
              (store, "9m45s", {"{}": 0.0}),
              (store, "10m45s", {"{}": 0.0167}),
              (store, "12m", {"{}": 0.0})]
    assert promql_mismatches(tmp_path, LOST, checks) == ""


# Retired calls and their duplicate.retired_invoked findings (PathwatchRetiredImplementationCalled
# reads both; the panel showed the calls only): demo.Old called since 150 s (3 calls, a finding),
# again at 10m (2 calls, a finding); demo.Dead's first call and finding on a new sidecar (pod-b,
# 10m) before Prometheus's first scrape of it (10m30s): both first scraped at 1. demo.Gone's calls
# have no finding series of their own (the findings' label cap folded its name into `other`): 0.
def retired_series(implementation: str, instance: str, calls: str, findings: str | None,
                   created_s: str) -> list[tuple[str, str]]:
    where = f'role="execution_engine",implementation="{implementation}",entry_point="/ws"'
    series = counter_series("pathwatch_calls", f'{where},canonical="false",retired="true",'
                            'nested="false"', instance, calls, created_s)
    if findings is not None:
        series += counter_series("pathwatch_findings", f'rule="duplicate.retired_invoked",'
                                 f'severity="warning",{where}', instance, findings, created_s)
    return series


RETIRED_SERIES = [*retired_series("demo.Old", "pod-a:9464", "_x10 3x30 5x40", "_x10 1x30 2x40",
                                  "_x10 150x70"),
                  *retired_series("demo.Dead", "pod-b:9464", "_x42 1x38", "_x42 1x38", "_x42 600x38"),
                  *retired_series("demo.Gone", "pod-a:9464", "0x39 1x41", None, "0x80")]


def test_retired_implementations_show_their_retired_invoked_findings_beside_the_calls(
        tmp_path) -> None:
    findings = rounded(panel_query("pathwatch-consolidation.json",
                                   "Retired implementations still called", "B"))
    key = ('{{rule="duplicate.retired_invoked", role="execution_engine", '
           'implementation="{}"}}').format
    old, dead, gone = key("demo.Old"), key("demo.Dead"), key("demo.Gone")
    checks = [(findings, "2m", {gone: 0.0}),  # no retired call yet but demo.Gone's series at 0
              (findings, "2m45s", {old: 0.0167, gone: 0.0}),  # born at 150 s at its first: 1 / 60 s
              (findings, "9m45s", {old: 0.0, gone: 0.0}),
              (findings, "10m15s", {old: 0.0167, gone: 0.0}),
              (findings, "10m45s", {old: 0.0167, dead: 0.0167, gone: 0.0}),
              (findings, "12m", {old: 0.0, dead: 0.0, gone: 0.0})]
    assert promql_mismatches(tmp_path, RETIRED_SERIES, checks) == ""


# The consolidation ledger (PathwatchConsolidationLedgerNotPersisted): pod-a persisted since 0 s,
# its writes failing 3 times from 10m (a lock) and persisted again at 10m30s; a new sidecar (pod-b,
# started at 10m) that found its ledger file unreadable and moved it aside before Prometheus's
# first scrape of it (10m30s): its unreadable series is first scraped at 1, its state moved_aside.
def ledger_series(instance: str, start: str, state: str, errors: dict[tuple[str, str], str],
                  created_s: str) -> list[tuple[str, str]]:
    series = [(f'pathwatch_ledger_state{{state="{each}",job="pathwatch",instance="{instance}"}}',
               values) for each, values in state]
    for (operation, cause), values in errors.items():
        series += counter_series("pathwatch_ledger_errors",
                                 f'operation="{operation}",cause="{cause}"', instance,
                                 start + values, created_s)
    return series


LEDGER = [
    *ledger_series("pod-a:9464", "", [("persisted", "1x39 0x1 1x80"),
                                      ("write_failing", "0x39 1x1 0x80")],
                   {("open", "unreadable"): "0x120", ("write", "sqlite_error"): "0x39 2 3x80"},
                   "0x120"),
    *ledger_series("pod-b:9464", "_x42 ", [("moved_aside", "_x42 1x78")],
                   {("open", "unreadable"): "1x78", ("write", "sqlite_error"): "0x78"},
                   "_x42 600x78"),
]


def test_the_ledger_panel_shows_the_sidecars_per_state_and_a_file_moved_aside_before_the_first_scrape(
        tmp_path) -> None:
    title = "Consolidation ledger persistence"
    states, moved, errors = (render_for_prometheus(panel_query("pathwatch-consolidation.json",
                                                               title, ref), rate_interval="1m")
                             for ref in "ABC")
    write = '{operation="write",cause="sqlite_error"}'
    checks = [(states, "9m45s", {'{state="persisted"}': 1.0, '{state="write_failing"}': 0.0}),
              (states, "10m15s", {'{state="persisted"}': 0.0, '{state="write_failing"}': 1.0}),
              (states, "10m45s", {'{state="persisted"}': 1.0, '{state="write_failing"}': 0.0,
                                  '{state="moved_aside"}': 1.0}),
              (moved, "9m45s", {"{}": 0.0}),
              (moved, "10m45s", {"{}": 1.0}),  # first scraped at 1: counted whole
              (moved, "24m45s", {"{}": 1.0}),
              (moved, "25m15s", {"{}": 0.0}),  # 15 minutes after the move
              (errors, "9m45s", {write: 0.0}),
              (errors, "10m45s", {write: 3.0})]
    assert promql_mismatches(tmp_path, LEDGER, checks) == ""


# An event's emit-to-write latency on the demo backend (examples/, an in-process WebSocket write;
# 5 event types x 50 runs, /tmp/s33_metricsreview/latency.py): 148-164 us on average, 48 of 50
# below 1 ms. With 1 ms as the lowest bucket, histogram_quantile read every quantile below it by
# linear interpolation from 0: the panel's p50 said 0.5 ms and p90 0.9 ms, 3-6x the real times,
# and the same whatever the real ones were.
def test_delivery_latency_quantiles_resolve_the_sub_millisecond_writes_of_an_in_process_backend(
        tmp_path) -> None:
    histogram = Telemetry(CollectorRegistry()).delivery_latency.labels("agent_started")
    for latency_s in [0.00015] * 45 + [0.0002] * 3 + [0.002] * 2:
        histogram.observe(latency_s)
    series = [(BUILD_INFO, "1x80")]
    for metric in histogram._samples():  # the child's own samples: _bucket{le}, _count, _sum, ...
        if metric.name == "_bucket":
            name = (f'pathwatch_delivery_latency_seconds_bucket{{le="{metric.labels["le"]}",'
                    f'event_type="agent_started",{TARGET}}}')
            series.append((name, f"0x40 {metric.value:g}x40"))
    series.append((f'pathwatch_delivery_latency_seconds_created{{event_type="agent_started",{TARGET}}}',
                   "0x80"))
    checks = []
    for ref_id, quantile, bound_s in (("A", 0.5, 0.0003), ("B", 0.9, 0.0003)):
        expr = render_for_prometheus(panel_query("pathwatch-delivery.json", "Delivery latency", ref_id),
                                     rate_interval="1m")
        assert f"histogram_quantile({quantile}," in expr
        checks.append((f"({expr}) < bool {bound_s}", "10m30s", {"{}": 1}))
    assert promql_mismatches(tmp_path, series, checks) == ""
