"""Prometheus metrics of the service (one registry per app, exposed at GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


class ServiceMetrics:
    """Every metric the service exports, registered in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "catdog_http_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "catdog_http_request_duration_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("catdog_http_requests_in_flight", "Requests being handled.", registry=r)
        self.predictions = Counter(
            "catdog_predictions", "Predictions by predicted label.", ["label"], registry=r
        )
        self.confidence = Histogram(
            "catdog_prediction_confidence",
            "Probability of the predicted label.",
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "catdog_rejected_images", "Uploads refused, by error code.", ["code"], registry=r
        )
        self.batch_size = Histogram(
            "catdog_inference_batch_size",
            "Images per model call (micro-batching).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "catdog_inference_duration_seconds",
            "Seconds per model call.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Gauge("catdog_inference_queue_images", "Images waiting for the model.", registry=r)
        self.decode_memory = Gauge(
            "catdog_decode_memory_bytes",
            "Estimated peak bytes the image decodes in progress hold (reserved from the decode budget).",
            registry=r,
        )
        self.decode_budget = Gauge(
            "catdog_decode_budget_bytes",
            "The decode budget: MEMORY_LIMIT_MB x DECODE_MEMORY_FRACTION.",
            registry=r,
        )
        self.guard_refused = Counter(
            "catdog_http_requests_refused_total",
            "Requests the request guard refused before the app read them, by error code (overloaded, "
            "body_timeout, too_many_files, upload_too_large, unsupported_media_type, invalid_request).",
            ["reason"],
            registry=r,
        )
        self.model = Info("catdog_model", "The model being served.", registry=r)
        self.ready = Gauge("catdog_model_ready", "1 when a warmed-up model is serving.", registry=r)
        self.reloads = Counter("catdog_model_reloads", "Model (re)loads by outcome.", ["outcome"], registry=r)
        self.drift_score = Gauge(
            "catdog_drift_score",
            "PSI of the drift window against the model's reference, by property (NaN while too few images "
            "or without a reference).",
            ["property"],
            registry=r,
        )
        self.drift_detected = Gauge(
            "catdog_drift_detected",
            "1 when a property's PSI is over DRIFT_PSI_THRESHOLD.",
            ["property"],
            registry=r,
        )
        self.drift_window = Gauge("catdog_drift_window_images", "Images in the drift window.", registry=r)
        self.live_accuracy = Gauge(
            "catdog_live_accuracy",
            "Accuracy of the most recent predictions that got ground-truth feedback (NaN before any).",
            registry=r,
        )
        self.live_accuracy_window = Gauge(
            "catdog_live_accuracy_window",
            "Labelled predictions the live accuracy is computed over.",
            registry=r,
        )
        self.feedback = Counter(
            "catdog_feedback", "Ground-truth feedback received, by outcome.", ["outcome"], registry=r
        )
        self.monitoring_dropped = Counter(
            "catdog_monitoring_dropped",
            "Observations monitoring dropped because it fell behind, by monitor.",
            ["monitor"],
            registry=r,
        )
        self.out_of_distribution = Counter(
            "catdog_out_of_distribution",
            "Predictions whose picture does not look like a cat or a dog (pet score below the model's "
            "threshold); only models with the score count.",
            registry=r,
        )
        self.ood_checked = Counter(
            "catdog_ood_checked",
            "Predictions the out-of-distribution score was computed for (the denominator of the OOD rate).",
            registry=r,
        )
        self.live_accuracy.set(float("nan"))
        for outcome in ("correct", "incorrect"):
            self.feedback.labels(outcome=outcome)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)

    def observe_accuracy(self, accuracy: float | None, labelled: int) -> None:
        self.live_accuracy.set(float("nan") if accuracy is None else accuracy)
        self.live_accuracy_window.set(labelled)

    def observe_ood(self, in_distribution: bool) -> None:
        self.ood_checked.inc()
        if not in_distribution:
            self.out_of_distribution.inc()

    def observe_prediction(self, label: str, confidence: float) -> None:
        self.predictions.labels(label=label).inc()
        self.confidence.observe(confidence)
