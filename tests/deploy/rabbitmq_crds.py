"""Minimal JSON schemas of the RabbitMQ operators' custom resources the chart renders
(broker.operator): ``RabbitmqCluster`` (RabbitMQ Cluster Operator) and ``User``,
``Permission``, ``Policy``, ``Vhost`` (Messaging Topology Operator), all ``rabbitmq.com/v1beta1``.

Written for this project from the operators' API reference (the fields, required fields and
enums documented for each spec), not copied from the upstream CRDs: no PyPI, npm or Debian
package reachable from here ships those CRDs or JSON schemas generated from them (the npm
models packages ``@kubernetes-models/rabbitmq-cluster-operator`` and
``...-messaging-topology-operator`` are not on the registry this project can reach), and
the tests must not fetch anything at run time. They are closed (``additionalProperties:
false``) on every object the chart fills, so a misspelt or invented field fails, and they
pin what the operators themselves would reject (a required field missing, a tag or
``applyTo`` outside its enum). They do not model every field of the upstream CRDs: an
object using a field the chart never renders may be refused here although the operator
would take it; add the field when the chart grows."""

from __future__ import annotations

_STR = {"type": "string", "minLength": 1}
_ANY_OBJECT = {"type": "object"}
# Kubernetes quantities as the API server accepts them: a number or a string like 2Gi, 500m.
_QUANTITY = {
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"},
    ]
}
_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}


def _closed(properties: dict, *required: str) -> dict:
    schema: dict = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def _resource(kind: str, spec: dict) -> dict:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "rabbitmq.com/v1beta1"},
            "kind": {"const": kind},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            },
            "spec": spec,
        },
    }


_LOCAL_REF = _closed({"name": _STR}, "name")
_RESOURCES = _closed(
    {
        "requests": {"type": "object", "additionalProperties": _QUANTITY},
        "limits": {"type": "object", "additionalProperties": _QUANTITY},
    }
)

RABBITMQ_CLUSTER = _resource(
    "RabbitmqCluster",
    _closed(
        {
            "replicas": {"type": "integer", "minimum": 0},
            "image": _STR,
            "imagePullSecrets": {"type": "array", "items": _LOCAL_REF},
            "service": _closed(
                {
                    "type": {"enum": ["ClusterIP", "LoadBalancer", "NodePort"]},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                    "ipFamilyPolicy": {
                        "enum": ["SingleStack", "PreferDualStack", "RequireDualStack"]
                    },
                }
            ),
            "persistence": _closed({"storageClassName": _STR, "storage": _QUANTITY}),
            "resources": _RESOURCES,
            "affinity": _ANY_OBJECT,
            "tolerations": {"type": "array", "items": _ANY_OBJECT},
            "rabbitmq": _closed(
                {
                    "additionalPlugins": {"type": "array", "items": _STR, "maxItems": 100},
                    "additionalConfig": {"type": "string", "maxLength": 100000},
                    "advancedConfig": {"type": "string", "maxLength": 100000},
                    "envConfig": {"type": "string", "maxLength": 100000},
                    "erlangInetConfig": {"type": "string", "maxLength": 2000},
                }
            ),
            "tls": _closed(
                {
                    "secretName": _STR,
                    "caSecretName": _STR,
                    "disableNonTLSListeners": {"type": "boolean"},
                }
            ),
            "override": _closed({"statefulSet": _ANY_OBJECT, "service": _ANY_OBJECT}),
            "skipPostDeployChecks": {"type": "boolean"},
            "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
            "delayStartSeconds": {"type": "integer", "minimum": 0},
            "autoEnableAllFeatureFlags": {"type": "boolean"},
            "secretBackend": _ANY_OBJECT,
        }
    ),
)

# Where a topology object lives: a RabbitmqCluster by name (and namespace), or a Secret
# with the connection details of a cluster no operator runs.
_CLUSTER_REF = {
    **_closed({"name": _NAME, "namespace": _NAME, "connectionSecret": _LOCAL_REF}),
    "anyOf": [{"required": ["name"]}, {"required": ["connectionSecret"]}],
}

USER = _resource(
    "User",
    _closed(
        {
            "tags": {
                "type": "array",
                "uniqueItems": True,
                "items": {"enum": ["management", "policymaker", "monitoring", "administrator"]},
            },
            "rabbitmqClusterReference": _CLUSTER_REF,
            "importCredentialsSecret": _LOCAL_REF,
        },
        "rabbitmqClusterReference",
    ),
)

PERMISSION = _resource(
    "Permission",
    {
        **_closed(
            {
                "user": _STR,
                "userReference": _LOCAL_REF,
                "vhost": _STR,
                "permissions": _closed(
                    {
                        "configure": {"type": "string"},
                        "write": {"type": "string"},
                        "read": {"type": "string"},
                    }
                ),
                "rabbitmqClusterReference": _CLUSTER_REF,
            },
            "vhost",
            "permissions",
            "rabbitmqClusterReference",
        ),
        # exactly one of user and userReference
        "oneOf": [{"required": ["user"]}, {"required": ["userReference"]}],
    },
)

POLICY = _resource(
    "Policy",
    _closed(
        {
            "name": _STR,
            "vhost": _STR,
            "pattern": _STR,
            "applyTo": {"enum": ["queues", "classic_queues", "quorum_queues", "exchanges", "all"]},
            "priority": {"type": "integer"},
            "definition": {"type": "object", "minProperties": 1},
            "rabbitmqClusterReference": _CLUSTER_REF,
        },
        "name",
        "pattern",
        "definition",
        "rabbitmqClusterReference",
    ),
)

VHOST = _resource(
    "Vhost",
    _closed(
        {
            "name": _STR,
            "tracing": {"type": "boolean"},
            "defaultQueueType": {"enum": ["classic", "quorum", "stream"]},
            "tags": {"type": "array", "items": _STR},
            "rabbitmqClusterReference": _CLUSTER_REF,
        },
        "name",
        "rabbitmqClusterReference",
    ),
)

SCHEMAS = {
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): RABBITMQ_CLUSTER,
    ("rabbitmq.com/v1beta1", "User"): USER,
    ("rabbitmq.com/v1beta1", "Permission"): PERMISSION,
    ("rabbitmq.com/v1beta1", "Policy"): POLICY,
    ("rabbitmq.com/v1beta1", "Vhost"): VHOST,
}
