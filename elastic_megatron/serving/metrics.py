"""Prometheus metrics of the server (prometheus_client, a registry of its own; `GET /metrics`).

    elastic_megatron_queue_depth                         sequences waiting for a decode slot
    elastic_megatron_running_sequences{budget}           sequences holding a slot of the budget
    elastic_megatron_prompt_tokens_total{budget}         prompt tokens prefilled
    elastic_megatron_generated_tokens_total{budget}      tokens generated
    elastic_megatron_time_to_first_token_seconds{budget} arrival to first token (histogram)
    elastic_megatron_inter_token_latency_seconds{budget} between two tokens of a sequence (histogram)
    elastic_megatron_requests_total{endpoint,status}     requests answered, by HTTP status
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "elastic_megatron_"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, budgets: list[str]):
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge(PREFIX + "queue_depth", "Sequences waiting for a decode slot", registry=r)
        self.running = Gauge(PREFIX + "running_sequences", "Sequences holding a decode slot", ["budget"], registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens prefilled", ["budget"], registry=r)
        self.generated_tokens = Counter(PREFIX + "generated_tokens", "Tokens generated", ["budget"], registry=r)
        self.first_token = Histogram(PREFIX + "time_to_first_token_seconds", "Arrival of a request to its first token",
                                     ["budget"], buckets=FIRST_TOKEN_BUCKETS, registry=r)
        self.inter_token = Histogram(PREFIX + "inter_token_latency_seconds", "Time between two tokens of a sequence",
                                     ["budget"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter(PREFIX + "requests", "Requests answered", ["endpoint", "status"], registry=r)
        for budget in budgets:  # every budget's series exists from the start (at 0)
            for family in (self.running, self.prompt_tokens, self.generated_tokens, self.first_token, self.inter_token):
                family.labels(budget)

    def render(self) -> bytes:
        return generate_latest(self.registry)
