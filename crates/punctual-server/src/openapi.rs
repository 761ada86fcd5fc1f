//! The OpenAPI 3.1 description of the HTTP API, built from the server's own limits and constants,
//! served at `GET /v1/openapi.json` and committed as `docs/openapi.json` (a test keeps the two
//! equal: `PUNCTUAL_WRITE_OPENAPI=1 cargo test -p punctual-server --test api openapi` rewrites the
//! committed one). docs/api.md is the prose; this is what a client generator or a validator reads.

use punctual_core::Limits;
use punctual_core::schedule::{MAX_EVERY_MS, MIN_EVERY_MS};
use serde_json::{Value, json};

use crate::service::{
    LIST_DEFAULT_LIMIT, LIST_MAX_LIMIT, TIMELINE_DEFAULT_BUCKETS, TIMELINE_MAX_BUCKETS,
};

/// A time in a query: unix ms, or an RFC 3339 date-time.
const TIME_PATTERN: &str = "^([0-9]{1,19}|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2}))$";

fn schema(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn response(name: &str) -> Value {
    json!({"$ref": format!("#/components/responses/{name}")})
}

fn param(name: &str) -> Value {
    json!({"$ref": format!("#/components/parameters/{name}")})
}

fn body(name: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema(name)}}})
}

fn json_answer(description: &str, name: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema(name)}}})
}

/// The answers every `/v1` operation may give besides its own.
fn common(mut answers: Value) -> Value {
    let map = answers.as_object_mut().expect("an object");
    for (status, name) in [
        ("400", "BadRequest"),
        ("401", "Unauthorized"),
        ("500", "Internal"),
        ("503", "Unavailable"),
    ] {
        map.entry(status).or_insert_with(|| response(name));
    }
    answers
}

/// An operation with the queue parameter, tagged.
fn op(tag: &str, summary: &str, params: &[&str], answers: Value) -> Value {
    let params: Vec<Value> = params.iter().map(|p| param(p)).collect();
    json!({"tags": [tag], "summary": summary, "parameters": params, "responses": common(answers)})
}

/// Lets an optional request field be `null` too (the server reads `null` as "not given").
fn nullable(mut v: Value) -> Value {
    if let Some(t) = v.get("type").and_then(Value::as_str).map(str::to_owned) {
        v["type"] = json!([t, "null"]);
        v
    } else {
        json!({"anyOf": [v, {"type": "null"}]})
    }
}

/// [`nullable`] for every property of an object schema but `keep`.
fn nullable_fields(mut object: Value, keep: &[&str]) -> Value {
    if let Some(props) = object["properties"].as_object_mut() {
        for (k, v) in props.iter_mut() {
            if !keep.contains(&k.as_str()) {
                *v = nullable(v.take());
            }
        }
    }
    object
}

fn with_body(mut operation: Value, request: Value) -> Value {
    operation["requestBody"] = request;
    operation
}

/// The document for a server with `limits`.
pub fn document(limits: &Limits) -> Value {
    // Giving both of a pair is refused; a null counts as not given.
    let both_times = json!({"required": ["delay_ms", "run_at"], "properties": {"delay_ms": {"type": "integer"}, "run_at": {"type": "string"}}});
    let both_backoffs = json!({"required": ["backoff_ms", "backoff"], "properties": {"backoff_ms": {"type": "array"}, "backoff": {"type": "object"}}});
    let ms =
        |description: &str| json!({"type": "integer", "minimum": 0, "description": description});
    let task_fields = json!({
        "payload": {"description": format!("Any JSON value, delivered byte for byte as sent; at most {} bytes of JSON text.", limits.max_payload_bytes)},
        "delay_ms": {"type": "integer", "minimum": 0, "maximum": limits.max_delay_ms, "description": "Due this long after now (give this or run_at; neither: due now)."},
        "run_at": {"type": "string", "format": "date-time", "description": "Due at this RFC 3339 time, with a zone (not with delay_ms)."},
        "max_attempts": {"type": "integer", "minimum": 1, "maximum": limits.max_attempts},
        "backoff_ms": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": limits.max_delay_ms}, "minItems": 1, "maxItems": limits.max_attempts, "description": "A retry ladder: the delay before each retry (the last repeats); not with backoff."},
        "backoff": schema("Exponential"),
        "webhook": schema("Webhook"),
        "lease_ms": {"type": "integer", "minimum": limits.min_lease_ms, "maximum": limits.max_lease_ms},
    });
    let mut schedule_request = json!({
        "type": "object",
        "additionalProperties": false,
        "not": {"anyOf": [both_times.clone(), both_backoffs.clone()]},
        "properties": {"id": {"type": "string", "minLength": 1, "maxLength": limits.max_id_bytes, "description": "Your id for the task (idempotency key); generated when absent."}},
    });
    for (k, v) in task_fields.as_object().unwrap() {
        schedule_request["properties"][k] = v.clone();
    }
    let mut recurring = json!({
        "type": "object",
        "additionalProperties": false,
        "oneOf": [{"required": ["every_ms"]}, {"required": ["cron"]}],
        "not": both_backoffs.clone(),
        "properties": {
            "every_ms": {"type": "integer", "minimum": MIN_EVERY_MS, "maximum": MAX_EVERY_MS, "description": "Every N ms (give this or cron)."},
            "cron": {"type": "string", "minLength": 1, "description": "A cron expression: 5 or 6 fields (with seconds), names, L, W, #, nicknames."},
            "timezone": {"type": "string", "minLength": 1, "description": "An IANA zone for cron (default UTC)."},
            "start_at": {"type": "string", "format": "date-time"},
            "end_at": {"type": "string", "format": "date-time"},
            "missed": {"enum": ["skip", "latest", "all"]},
            "overlap": {"enum": ["allow", "skip"]},
            "paused": {"type": "boolean"},
        },
    });
    for (k, v) in task_fields.as_object().unwrap() {
        if !matches!(k.as_str(), "delay_ms" | "run_at") {
            recurring["properties"][k] = v.clone();
        }
    }
    let error_codes = [
        "invalid_field",
        "invalid_json",
        "invalid_queue",
        "invalid_id",
        "bad_query",
        "payload_too_large",
        "batch_too_large",
        "not_found",
        "no_route",
        "method_not_allowed",
        "conflict",
        "wrong_state",
        "lease_mismatch",
        "lease_expired",
        "lease_superseded",
        "unauthorized",
        "too_many_connections",
        "server_busy",
        "unavailable",
        "store_poisoned",
        "insufficient_storage",
        "request_timeout",
        "unsupported_media_type",
        "internal",
    ];
    let task_id = json!({"type": "string", "minLength": 1, "maxLength": limits.max_id_bytes});
    let queue_name = json!({"type": "string", "minLength": 1, "maxLength": limits.max_queue_bytes, "pattern": "^[A-Za-z0-9._:-]+$"});

    let schemas = json!({
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "description": format!("One of: {}.", error_codes.join(", "))},
                    "message": {"type": "string", "description": "What was wrong and what to send instead."},
                },
            }},
        },
        "State": {"enum": ["scheduled", "ready", "leased", "succeeded", "dead"]},
        "Exponential": nullable_fields(json!({
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "initial_ms": {"type": "integer", "minimum": 0},
                "factor": {"type": "number", "minimum": 1},
                "max_ms": {"type": "integer", "minimum": 0},
                "jitter": {"type": "boolean"},
            },
        }), &[]),
        "Webhook": {
            "type": "object",
            "additionalProperties": false,
            "required": ["url"],
            "properties": {
                "url": {"type": "string", "minLength": 8, "maxLength": limits.max_url_bytes, "pattern": "^https?://[^/?#@\\s]+", "description": "http:// or https://; private addresses only where the server allows them (docs/webhooks.md)."},
                "headers": {
                    "type": "object",
                    "description": "Sent with the delivery; connection-level headers and punctual-* are refused.",
                    "propertyNames": {
                        "pattern": "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$",
                        "not": {"anyOf": [
                            {"enum": ["host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade", "proxy-connection", "proxy-authenticate", "proxy-authorization", "expect"]},
                            {"pattern": "^[Pp][Uu][Nn][Cc][Tt][Uu][Aa][Ll]-"},
                        ]},
                    },
                    "additionalProperties": {"type": "string", "pattern": "^[^\\u0000-\\u0008\\u000a-\\u001f\\u007f]*$"},
                },
                "timeout_ms": {"type": ["integer", "null"], "minimum": 1},
            },
        },
        "ScheduleRequest": nullable_fields(schedule_request, &["payload"]),
        "Task": {
            "type": "object",
            "required": ["queue", "id", "state", "run_at", "run_at_ms", "attempt", "max_attempts", "created_at", "created_at_ms", "updated_at_ms", "last_error"],
            "properties": {
                "queue": {"type": "string"},
                "id": {"type": "string", "description": "Up to max_id_bytes when given by a client; a schedule's record (queue punctual.schedules) has <queue>/<name>."},
                "state": schema("State"),
                "payload": {"description": "The payload as sent, when there is one."},
                "run_at": {"type": "string", "format": "date-time"},
                "run_at_ms": ms("When it is (or was) due, unix ms."),
                "attempt": {"type": "integer", "minimum": 0},
                "max_attempts": {"type": "integer", "minimum": 1},
                "backoff_ms": {"type": "array", "items": {"type": "integer"}},
                "backoff": schema("Exponential"),
                "webhook": schema("Webhook"),
                "lease_ms": {"type": "integer"},
                "created_at": {"type": "string", "format": "date-time"},
                "created_at_ms": ms("unix ms"),
                "updated_at_ms": ms("unix ms"),
                "last_error": {"type": ["string", "null"]},
                "lease_expires_at_ms": ms("While leased."),
                "lease_token": {"type": "string", "description": "Only in a reserve's answer."},
                "purge_at_ms": ms("When a succeeded task is purged."),
            },
        },
        "Tasks": {
            "type": "object",
            "required": ["tasks"],
            "properties": {"tasks": {"type": "array", "items": schema("Task")}},
        },
        "Page": {
            "type": "object",
            "required": ["tasks", "next_cursor"],
            "properties": {
                "tasks": {"type": "array", "items": schema("Task")},
                "next_cursor": {"type": ["string", "null"]},
            },
        },
        "BatchRequest": {
            "type": "object",
            "additionalProperties": false,
            "required": ["tasks"],
            "properties": {"tasks": {"type": "array", "maxItems": limits.max_batch, "items": {"allOf": [schema("ScheduleRequest")], "description": "Each item is checked on its own: a bad one (even one that is not an object) gets its own error in the results, and the others go on."}}},
        },
        "Results": {
            "type": "object",
            "required": ["results"],
            "properties": {"results": {"type": "array", "items": {
                "type": "object",
                "required": ["status"],
                "properties": {
                    "status": {"type": "integer", "description": "The status this item would have had alone."},
                    "task": schema("Task"),
                    "id": {"type": "string"},
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                    },
                },
            }}},
        },
        "ReserveRequest": nullable_fields(json!({
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "max": {"type": "integer", "minimum": 1, "maximum": limits.max_reserve, "default": 1},
                "wait_ms": {"type": "integer", "minimum": 0, "maximum": limits.max_wait_ms, "default": 0},
                "lease_ms": {"type": "integer", "minimum": limits.min_lease_ms, "maximum": limits.max_lease_ms},
            },
        }), &[]),
        "AckRequest": {
            "type": "object",
            "additionalProperties": false,
            "required": ["lease_token"],
            "properties": {"lease_token": {"type": "string"}},
        },
        "AckManyRequest": {
            "type": "object",
            "additionalProperties": false,
            "required": ["tasks"],
            "properties": {"tasks": {"type": "array", "minItems": 1, "maxItems": limits.max_batch, "items": {
                "type": "object",
                "additionalProperties": false,
                "required": ["id", "lease_token"],
                "description": "Each ack is answered on its own: an unknown id or a stale token gets its own error in the results.",
                "properties": {"id": {"type": "string"}, "lease_token": {"type": "string"}},
            }}},
        },
        "NackRequest": nullable_fields(json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["lease_token"],
            "properties": {
                "lease_token": {"type": "string"},
                "error": {"type": "string"},
                "delay_ms": {"type": "integer", "minimum": 0, "maximum": limits.max_delay_ms},
            },
        }), &["lease_token"]),
        "ExtendRequest": {
            "type": "object",
            "additionalProperties": false,
            "required": ["lease_token", "lease_ms"],
            "properties": {
                "lease_token": {"type": "string"},
                "lease_ms": {"type": "integer", "minimum": limits.min_lease_ms, "maximum": limits.max_lease_ms},
            },
        },
        "Reschedule": {
            "type": "object",
            "additionalProperties": false,
            "description": "At least one of delay_ms, run_at and payload, not null (a null payload is the JSON value null).",
            "anyOf": [
                {"required": ["delay_ms"], "properties": {"delay_ms": {"type": "integer"}}},
                {"required": ["run_at"], "properties": {"run_at": {"type": "string"}}},
                {"required": ["payload"]},
            ],
            "not": both_times.clone(),
            "properties": {
                "delay_ms": {"type": ["integer", "null"], "minimum": 0, "maximum": limits.max_delay_ms},
                "run_at": {"type": ["string", "null"], "format": "date-time"},
                "payload": {},
            },
        },
        "QueueCounts": {
            "type": "object",
            "required": ["queue", "scheduled", "ready", "leased", "succeeded", "dead", "total"],
            "properties": {
                "queue": queue_name.clone(),
                "scheduled": {"type": "integer"}, "ready": {"type": "integer"}, "leased": {"type": "integer"},
                "succeeded": {"type": "integer"}, "dead": {"type": "integer"}, "total": {"type": "integer"},
            },
        },
        "Queues": {
            "type": "object",
            "required": ["queues"],
            "properties": {"queues": {"type": "array", "items": schema("QueueCounts")}},
        },
        "Timeline": {
            "type": "object",
            "required": ["queue", "from_ms", "to_ms", "bucket_ms", "resolution_ms", "total", "buckets"],
            "properties": {
                "queue": queue_name.clone(),
                "from_ms": ms("Start of the first slice."),
                "to_ms": ms("End of the last slice (at or a little after the to asked for)."),
                "bucket_ms": {"type": "integer", "minimum": 1},
                "resolution_ms": {"type": "integer", "minimum": 1, "description": "1: exact; more: a task may be counted in an earlier slice by less than this."},
                "total": {"type": "integer"},
                "buckets": {"type": "array", "items": {
                    "type": "object",
                    "required": ["start_ms", "count"],
                    "properties": {"start_ms": {"type": "integer"}, "count": {"type": "integer"}},
                }},
            },
        },
        "RecurringRequest": nullable_fields(recurring, &["payload", "every_ms", "cron"]),
        "Schedule": {
            "type": "object",
            "required": ["queue", "name", "paused", "next_runs"],
            "properties": {
                "queue": queue_name.clone(),
                "name": {"type": "string"},
                "every_ms": {"type": "integer"},
                "cron": {"type": "string"},
                "timezone": {"type": "string"},
                "paused": {"type": "boolean"},
                "occurrences_created": {"type": "integer"},
                "occurrences_skipped": {"type": "integer"},
                "next_runs": {"type": "array", "items": {
                    "type": "object",
                    "properties": {"run_at": {"type": "string"}, "run_at_ms": {"type": "integer"}},
                }},
            },
        },
        "Schedules": {
            "type": "object",
            "required": ["schedules"],
            "properties": {"schedules": {"type": "array", "items": schema("Schedule")}},
        },
        "Server": {
            "type": "object",
            "required": ["version", "store", "status", "started_at_ms", "uptime_ms", "now_ms"],
            "properties": {
                "version": {"type": "string"},
                "store": {"type": "string"},
                "status": {"enum": ["ok", "failing"]},
                "error": {"type": ["string", "null"]},
                "data_dir": {"type": ["string", "null"]},
                "disk_used_bytes": {"type": ["integer", "null"]},
                "disk_free_bytes": {"type": ["integer", "null"]},
                "started_at_ms": {"type": "integer"},
                "uptime_ms": {"type": "integer"},
                "now_ms": {"type": "integer"},
            },
        },
        "Targets": {
            "type": "object",
            "required": ["targets", "now_ms"],
            "properties": {
                "now_ms": {"type": "integer"},
                "targets": {"type": "array", "items": {
                    "type": "object",
                    "required": ["host", "in_flight", "failures_in_a_row", "backed_off_until_ms", "recent"],
                    "properties": {
                        "host": {"type": "string"},
                        "in_flight": {"type": "integer"},
                        "failures_in_a_row": {"type": "integer"},
                        "backed_off_until_ms": {"type": ["integer", "null"]},
                        "recent": {"type": "array", "items": {
                            "type": "object",
                            "properties": {"at_ms": {"type": "integer"}, "ok": {"type": "boolean"}},
                        }},
                    },
                }},
            },
        },
    });

    let error = |description: &str| json!({"description": description, "content": {"application/json": {"schema": schema("Error")}}});
    let responses = json!({
        "BadRequest": error("The request cannot be read: bad JSON, a bad queue name or id, a bad query (invalid_json, invalid_queue, invalid_id, bad_query)."),
        "Unauthorized": error("A token is configured and none (or a wrong one) was sent (unauthorized)."),
        "NotFound": error("No such task or schedule (not_found)."),
        "Conflict": error("The task's state or lease does not allow it (wrong_state, lease_mismatch, lease_expired, lease_superseded, conflict)."),
        "TooLarge": error(&format!("A payload over {} bytes, or a body over its limit (payload_too_large).", limits.max_payload_bytes)),
        "Invalid": error("A field or parameter is out of range or of the wrong type; the message names it (invalid_field, batch_too_large)."),
        "Internal": error("A fault of the server (internal)."),
        "Unavailable": error("The store is unavailable or poisoned, or the server is busy (unavailable, store_poisoned, server_busy); retry after Retry-After when given."),
        "NoSpace": error("The disk is full: nothing was kept (insufficient_storage)."),
    });
    let parameters = json!({
        "queue": {"name": "queue", "in": "path", "required": true, "schema": queue_name.clone()},
        "id": {"name": "id", "in": "path", "required": true, "schema": task_id},
        "name": {"name": "name", "in": "path", "required": true, "schema": queue_name.clone()},
        "state": {"name": "state", "in": "query", "schema": schema("State")},
        "limit": {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": LIST_MAX_LIMIT, "default": LIST_DEFAULT_LIMIT}},
        "cursor": {"name": "cursor", "in": "query", "schema": {"type": "string"}, "description": "The next_cursor of the page before."},
        "order": {"name": "order", "in": "query", "schema": {"enum": ["id", "due"], "default": "id"}, "description": "due: scheduled tasks in due order (state must be absent or scheduled)."},
        "from": {"name": "from", "in": "query", "schema": {"type": "string", "pattern": TIME_PATTERN}, "description": "Unix ms or RFC 3339 (default now)."},
        "to": {"name": "to", "in": "query", "schema": {"type": "string", "pattern": TIME_PATTERN}, "description": "Unix ms or RFC 3339 (default a day after from); at most max_delay_ms after now."},
        "buckets": {"name": "buckets", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": TIMELINE_MAX_BUCKETS, "default": TIMELINE_DEFAULT_BUCKETS}},
    });

    let q = ["queue"];
    let qi = ["queue", "id"];
    let qn = ["queue", "name"];
    let task_200 = |d: &str| json_answer(d, "Task");
    let paths = json!({
        "/v1/queues": {"get": op("queues", "Counts per state of every queue", &[], json!({"200": json_answer("Every queue that holds a task.", "Queues")}))},
        "/v1/queues/{queue}": {"get": op("queues", "One queue's counts (zeros for an empty queue)", &q, json!({"200": json_answer("The counts.", "QueueCounts")}))},
        "/v1/queues/{queue}/tasks": {
            "post": with_body(op("tasks", "Schedule a task", &q, json!({
                "201": task_200("Created."),
                "200": task_200("The same request again: the existing task."),
                "409": response("Conflict"), "413": response("TooLarge"), "422": response("Invalid"), "507": response("NoSpace"),
            })), body("ScheduleRequest")),
            "get": {
                "tags": ["tasks"], "summary": "A page of a queue's tasks, in id order or (order=due) scheduled ones in due order",
                "parameters": [param("queue"), param("state"), param("limit"), param("cursor"), param("order")],
                "responses": common(json!({"200": json_answer("A page.", "Page"), "422": response("Invalid")})),
            },
        },
        "/v1/queues/{queue}/timeline": {"get": {
            "tags": ["queues"], "summary": "Scheduled tasks counted by due time in equal slices",
            "parameters": [param("queue"), param("from"), param("to"), param("buckets")],
            "responses": common(json!({"200": json_answer("The counts.", "Timeline"), "422": response("Invalid")})),
        }},
        "/v1/queues/{queue}/batch": {"post": with_body(op("tasks", "Schedule up to max_batch tasks; each item is answered on its own", &q, json!({
            "200": json_answer("One result per item, in order.", "Results"),
            "413": response("TooLarge"), "422": response("Invalid"), "507": response("NoSpace"),
        })), body("BatchRequest"))},
        "/v1/queues/{queue}/reserve": {"post": with_body(op("consumers", "Lease ready tasks, waiting up to wait_ms for some", &q, json!({
            "200": json_answer("The leased tasks, each with its lease_token (possibly none).", "Tasks"),
            "422": response("Invalid"),
        })), json!({"required": false, "content": {"application/json": {"schema": schema("ReserveRequest")}}}))},
        "/v1/queues/{queue}/ack": {"post": with_body(op("consumers", "Ack many leased tasks", &q, json!({
            "200": json_answer("One result per ack (204 each that settled).", "Results"),
            "422": response("Invalid"),
        })), body("AckManyRequest"))},
        "/v1/queues/{queue}/tasks/{id}": {
            "get": op("tasks", "A task", &qi, json!({"200": task_200("The task."), "404": response("NotFound")})),
            "patch": with_body(op("tasks", "Reschedule a task (due time and/or payload)", &qi, json!({
                "200": task_200("The task as it is now."), "404": response("NotFound"), "409": response("Conflict"),
                "413": response("TooLarge"), "422": response("Invalid"), "507": response("NoSpace"),
            })), body("Reschedule")),
            "delete": op("tasks", "Cancel (delete) a task that is not leased", &qi, json!({
                "204": {"description": "Deleted."}, "404": response("NotFound"), "409": response("Conflict"),
            })),
        },
        "/v1/queues/{queue}/tasks/{id}/ack": {"post": with_body(op("consumers", "Ack a leased task: done", &qi, json!({
            "204": {"description": "Succeeded; kept for the retention, then purged."}, "404": response("NotFound"), "409": response("Conflict"), "422": response("Invalid"),
        })), body("AckRequest"))},
        "/v1/queues/{queue}/tasks/{id}/nack": {"post": with_body(op("consumers", "Nack a leased task: failed, retried by its policy or dead", &qi, json!({
            "200": task_200("The task, scheduled for its retry or dead."), "204": {"description": "Settled."},
            "404": response("NotFound"), "409": response("Conflict"), "422": response("Invalid"),
        })), body("NackRequest"))},
        "/v1/queues/{queue}/tasks/{id}/extend": {"post": with_body(op("consumers", "Extend a lease", &qi, json!({
            "200": task_200("The task with its new lease."), "404": response("NotFound"), "409": response("Conflict"), "422": response("Invalid"),
        })), body("ExtendRequest"))},
        "/v1/queues/{queue}/tasks/{id}/retry": {"post": op("tasks", "Give a dead task fresh attempts: ready now", &qi, json!({
            "200": task_200("The task, ready."), "404": response("NotFound"), "409": response("Conflict"),
        }))},
        "/v1/schedules": {"get": op("schedules", "Every queue's recurring schedules", &[], json!({"200": json_answer("At most 1 000.", "Schedules")}))},
        "/v1/queues/{queue}/schedules": {"get": op("schedules", "A queue's recurring schedules", &q, json!({"200": json_answer("At most 1 000.", "Schedules")}))},
        "/v1/queues/{queue}/schedules/{name}": {
            "get": op("schedules", "A schedule", &qn, json!({"200": json_answer("The schedule.", "Schedule"), "404": response("NotFound")})),
            "put": with_body(op("schedules", "Create or replace a schedule", &qn, json!({
                "201": json_answer("Created.", "Schedule"), "200": json_answer("Replaced.", "Schedule"),
                "413": response("TooLarge"), "422": response("Invalid"), "507": response("NoSpace"),
            })), body("RecurringRequest")),
            "delete": op("schedules", "Delete a schedule (its occurrences stay)", &qn, json!({"204": {"description": "Deleted."}, "404": response("NotFound")})),
        },
        "/v1/queues/{queue}/schedules/{name}/{action}": {"post": {
            "tags": ["schedules"], "summary": "pause, resume, or trigger (one extra occurrence, due now)",
            "parameters": [param("queue"), param("name"), {"name": "action", "in": "path", "required": true, "schema": {"enum": ["pause", "resume", "trigger"]}}],
            "responses": common(json!({
                "200": json_answer("Paused or resumed: the schedule.", "Schedule"),
                "201": task_200("Triggered: the occurrence's task."),
                "404": response("NotFound"),
            })),
        }},
        "/v1/server": {"get": op("server", "Version, store, health and disk", &[], json!({"200": json_answer("The server.", "Server")}))},
        "/v1/webhooks/targets": {"get": op("server", "Webhook targets: in flight, failures, back-off, recent outcomes", &[], json!({"200": json_answer("Every host delivered to since the start.", "Targets")}))},
        "/v1/openapi.json": {"get": {
            "tags": ["server"], "summary": "This document", "security": [],
            "responses": {"200": {"description": "OpenAPI 3.1.", "content": {"application/json": {"schema": {"type": "object"}}}}},
        }},
        "/healthz": {"get": {
            "tags": ["server"], "summary": "Health (never needs a token)", "security": [],
            "responses": {
                "200": {"description": "Healthy.", "content": {"application/json": {"schema": {"type": "object", "properties": {"status": {"const": "ok"}}}}}},
                "503": {"description": "The store is failing.", "content": {"application/json": {"schema": {"type": "object", "properties": {"status": {"const": "failing"}, "error": {"type": "string"}}}}}},
            },
        }},
        "/metrics": {"get": {
            "tags": ["server"], "summary": "Prometheus metrics (a token only with --protect-metrics)", "security": [{}, {"bearer": []}],
            "responses": {"200": {"description": "Prometheus text format 0.0.4.", "content": {"text/plain": {"schema": {"type": "string"}}}}, "401": response("Unauthorized")},
        }},
    });

    // Names for generated clients' functions.
    let mut paths = paths;
    for (path, method, id) in [
        ("/v1/queues", "get", "listQueues"),
        ("/v1/queues/{queue}", "get", "getQueue"),
        ("/v1/queues/{queue}/tasks", "post", "scheduleTask"),
        ("/v1/queues/{queue}/tasks", "get", "listTasks"),
        ("/v1/queues/{queue}/timeline", "get", "getTimeline"),
        ("/v1/queues/{queue}/batch", "post", "scheduleBatch"),
        ("/v1/queues/{queue}/reserve", "post", "reserveTasks"),
        ("/v1/queues/{queue}/ack", "post", "ackTasks"),
        ("/v1/queues/{queue}/tasks/{id}", "get", "getTask"),
        ("/v1/queues/{queue}/tasks/{id}", "patch", "rescheduleTask"),
        ("/v1/queues/{queue}/tasks/{id}", "delete", "cancelTask"),
        ("/v1/queues/{queue}/tasks/{id}/ack", "post", "ackTask"),
        ("/v1/queues/{queue}/tasks/{id}/nack", "post", "nackTask"),
        (
            "/v1/queues/{queue}/tasks/{id}/extend",
            "post",
            "extendLease",
        ),
        ("/v1/queues/{queue}/tasks/{id}/retry", "post", "retryTask"),
        ("/v1/schedules", "get", "listAllSchedules"),
        ("/v1/queues/{queue}/schedules", "get", "listSchedules"),
        ("/v1/queues/{queue}/schedules/{name}", "get", "getSchedule"),
        ("/v1/queues/{queue}/schedules/{name}", "put", "putSchedule"),
        (
            "/v1/queues/{queue}/schedules/{name}",
            "delete",
            "deleteSchedule",
        ),
        (
            "/v1/queues/{queue}/schedules/{name}/{action}",
            "post",
            "scheduleAction",
        ),
        ("/v1/server", "get", "getServer"),
        ("/v1/webhooks/targets", "get", "listWebhookTargets"),
        ("/v1/openapi.json", "get", "getOpenApi"),
        ("/healthz", "get", "health"),
        ("/metrics", "get", "metrics"),
    ] {
        paths[path][method]["operationId"] = json!(id);
    }

    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Punctual",
            "version": env!("CARGO_PKG_VERSION"),
            "summary": "A durable delayed-task server: do this at time T, once, through crashes.",
            "description": "The HTTP API v1 (docs/api.md has the prose: lifecycle, guarantees, every refusal). With --auth-token, every /v1 operation needs `Authorization: Bearer <token>`. Limits here are the server's defaults; --max-payload-bytes and --max-batch change theirs.",
            "license": {"name": "MIT OR Apache-2.0", "identifier": "MIT OR Apache-2.0"},
        },
        "servers": [{"url": "http://127.0.0.1:7070", "description": "punctual serve, by default"}],
        "security": [{}, {"bearer": []}],
        "tags": [
            {"name": "tasks", "description": "Schedule, read, reschedule, cancel, retry."},
            {"name": "consumers", "description": "Reserve (long-poll), ack, nack, extend."},
            {"name": "queues", "description": "Counts and the timeline of what is due."},
            {"name": "schedules", "description": "Recurring schedules (docs/schedules.md)."},
            {"name": "server", "description": "Health, metrics, the server, webhook targets, this document."},
        ],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": responses,
            "parameters": parameters,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "One of the tokens the server was started with (--auth-token)."}},
        },
    })
}

#[cfg(test)]
mod tests {
    /// Every operation has a name for generated clients, and no name is used twice.
    #[test]
    fn every_operation_has_a_unique_id() {
        let doc = super::document(&punctual_core::Limits::default());
        let mut ids = std::collections::BTreeSet::new();
        for (path, methods) in doc["paths"].as_object().unwrap() {
            for (method, operation) in methods.as_object().unwrap() {
                let id = operation["operationId"].as_str();
                assert!(id.is_some(), "{method} {path} has no operationId");
                assert!(
                    ids.insert(id.unwrap().to_owned()),
                    "{method} {path}: a repeated id"
                );
            }
        }
    }
}
