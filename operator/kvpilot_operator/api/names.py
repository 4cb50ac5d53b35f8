"""Labels, selectors and derived object names: how kvpilot's objects find each other.

The operator writes these names, the router and the node agent read them, the autoscaler and the
rollout controller select Prometheus series by them. One module, so that every part agrees.
"""

from __future__ import annotations

# What the engine and the router listen on in their pods (`kvpilot serve --port`).
ENGINE_PORT = 8000
ROUTER_PORT = 8000
SERVICE_LABEL = "kvpilot.io/llmservice"
COMPONENT_LABEL = "app.kubernetes.io/component"
# Revision: a hash of everything that makes an engine pod serve differently (model, engine
# flags, quantization, image, resources). The router weighs traffic by it.
REVISION_LABEL = "kvpilot.io/revision"
# Track: which engine Deployment a pod belongs to (stable, canary); in the Deployment selectors,
# so that two Deployments of one service never select each other's pods.
TRACK_LABEL = "kvpilot.io/track"
# The resolved spec a Deployment's pods run, so that the stable revision can be rendered again
# while the LLMService's spec already describes the canary.
SPEC_ANNOTATION = "kvpilot.io/serving-spec"
ROUTES_KEY = "routes.json"  # the router's ConfigMap entry
# How Prometheus queries find one service's series: the labels a standard `kubernetes-pods`
# scrape job (labelmap of pod labels, plus `namespace`) gives them. Engines, routers and shadows
# all match it; queries add ENGINE_SERIES or ROUTER_SERIES.
PROMETHEUS_SELECTOR = 'namespace="{namespace}",kvpilot_io_llmservice="{name}"'
# Series of the engines that serve users: the shadow's never count in the autoscaler's signals.
ENGINE_SERIES = 'app_kubernetes_io_component!~"shadow|router"'
ROUTER_SERIES = 'app_kubernetes_io_component="router"'
MANAGED_BY = "kvpilot-operator"


def engine_name(service: str, track: str = "stable") -> str:
    """`<service>-engine` (stable), `<service>-engine-canary`, `<service>-engine-shadow`."""
    return f"{service}-engine" if track == "stable" else f"{service}-engine-{track}"


def router_name(service: str) -> str:
    return f"{service}-router"


def selector_labels(service: str, component: str = "engine") -> dict[str, str]:
    return {SERVICE_LABEL: service, COMPONENT_LABEL: component}


def selector_string(service: str) -> str:
    """The scale subresource's selector: every engine that serves users (stable and canary)."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(service).items())


def common_labels(service: str, component: str = "engine") -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kvpilot-router" if component == "router" else "kvpilot-engine",
        "app.kubernetes.io/instance": service,
        COMPONENT_LABEL: component,
        "app.kubernetes.io/part-of": "kvpilot",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        SERVICE_LABEL: service,
    }
