"""Tracing's on/off rule and its one-line errors (``proxymq.tracing``)."""

import pytest

from proxymq.parsers import ConfigError
from proxymq.tracing import TracingConfig


@pytest.mark.parametrize(
    ("env", "enabled"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
    ],
)
def test_tracing_is_on_only_when_an_exporter_is_named(env, enabled):
    assert TracingConfig.from_env(env).enabled is enabled


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": " "}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_SDK_DISABLED": "yes"}, "OTEL_SDK_DISABLED"),
    ],
)
def test_bad_values_are_one_line_errors(env, variable):
    with pytest.raises(ConfigError) as error:
        TracingConfig.from_env(env)
    assert error.value.variable == variable and "\n" not in str(error.value)


def test_off_sets_up_no_sdk():
    """(redis imports parts of OpenTelemetry's metrics SDK itself when it is installed:
    only the tracing SDK and exporter are checked.)"""
    import subprocess
    import sys

    code = (
        "import sys, gateway.proxy, workers.pipeline, proxymq.tracing as t;"
        "t.setup('x', {});"
        "print(t.ENABLED or any(m.startswith(('opentelemetry.sdk.trace',"
        " 'opentelemetry.exporter')) for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
