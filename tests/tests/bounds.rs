//! Every number has a cap: out-of-bound values for every query parameter and every job option
//! the OpenAPI document bounds (read from the live document, so a new parameter or option is
//! covered the day it is documented), absurd item counts, sizes and depths. Each is refused
//! with a 4xx that names it; nothing is accepted; the server keeps answering and, killed with
//! SIGKILL, starts again on the same store.

use serde_json::{Value, json};
use stagehand_tests::{
    MockLlm, client, eco_items, get_json, job_status, serve_eco_scan, submit_job, wait_for_job,
};

/// Values just past a schema's bounds, and one past any integer's.
fn out_of_bounds(schema: &Value) -> Vec<String> {
    let mut values = Vec::new();
    if let Some(max) = schema["maximum"].as_u64() {
        values.push((max + 1).to_string());
        values.push("18446744073709551616".to_string());
    }
    if let Some(min) = schema["minimum"].as_u64() {
        values.push(min.checked_sub(1).map_or("-1".into(), |v| v.to_string()));
    }
    if let Some(max) = schema["maxLength"].as_u64() {
        values.push("x".repeat(max as usize + 1));
    }
    values
}

/// A path of the document with its parameters filled in with things that exist.
fn concrete(path: &str, job: &str) -> String {
    path.replace("{id}", job)
        .replace("{job}", job)
        .replace("{index}", "0")
        .replace("{name}", "vision")
        .replace("{namespace}", "disposal_rules")
}

#[test]
fn out_of_bound_values_are_refused_by_name_and_the_server_survives_them() {
    let mock = MockLlm::start(&["--latency-ms", "0"]);
    let data = tempfile::tempdir().unwrap();
    let admin = ["--admin-token", "bounds-admin"];
    let server = serve_eco_scan(&mock, data.path(), &admin);
    let job = submit_job(&server, eco_items(2), json!({}));
    wait_for_job(&server, &job);
    let http = client();
    let document = get_json(&server, "/openapi.json");

    // Query parameters.
    let mut checked = Vec::new();
    for (path, operations) in document["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            let parameters = operation["parameters"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for parameter in parameters.iter().filter(|p| p["in"] == "query") {
                let name = parameter["name"].as_str().unwrap();
                for value in out_of_bounds(&parameter["schema"]) {
                    let url = server.url(&format!("{}?{name}={value}", concrete(path, &job)));
                    let request = match method.as_str() {
                        "get" => http.get(&url),
                        "put" => http.put(&url).body("not wasm"),
                        "post" => http.post(&url),
                        other => panic!("a bounded query parameter on {other} {path}"),
                    };
                    let response = request.bearer_auth("bounds-admin").send().unwrap();
                    let status = response.status().as_u16();
                    let body: Value = response.json().unwrap();
                    let shown = &value[..value.len().min(24)];
                    assert!(
                        status == 400 || status == 422,
                        "{method} {path}?{name}={shown}: {status} {body}"
                    );
                    let message = body["error"]["message"].as_str().unwrap();
                    if status == 422 {
                        assert!(message.contains(name), "{path}?{name}={shown}: {message}");
                    }
                    checked.push(format!("{path}?{name}"));
                }
            }
        }
    }
    for expected in [
        "/v1/jobs?limit",
        "/v1/jobs/{id}/results?page",
        "/v1/jobs/{id}/events?interval_ms",
        "/v1/jobs/{id}/events?max_items",
        "/v1/stages/{name}?canary",
        "/v1/dead-letters?stage",
    ] {
        assert!(
            checked.iter().any(|c| c == expected),
            "{expected} was not tried"
        );
    }

    // Job options, from their schema.
    let submit = |body: &Value| {
        let response = http.post(server.url("/v1/jobs")).json(body).send().unwrap();
        let status = response.status().as_u16();
        (status, response.json::<Value>().unwrap())
    };
    let options = &document["components"]["schemas"]["JobOptions"]["properties"];
    let mut tried = 0;
    for (name, schema) in options.as_object().unwrap() {
        for value in out_of_bounds(schema) {
            let value: Value = serde_json::from_str(&value).unwrap_or(Value::String(value));
            let (status, body) = submit(&json!({ "items": [{}], "options": { name: value } }));
            assert_eq!(status, 422, "options.{name} = {value}: {body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(
                message.contains(name),
                "options.{name} = {value}: {message}"
            );
            tried += 1;
        }
    }
    assert!(tried >= 10, "only {tried} option values were tried");

    // Labels, items and the idempotency key.
    let many: serde_json::Map<String, Value> =
        (0..33).map(|i| (format!("k{i}"), json!("v"))).collect();
    let deep = (0..65).fold(json!(1), |inner, _| json!([inner]));
    let refused = [
        (
            json!({ "items": [{}], "options": { "labels": many } }),
            "33 labels",
        ),
        (
            json!({ "items": [{}], "options": { "labels": { "k": "v".repeat(1025) } } }),
            "`options.labels.k` is 1025 bytes",
        ),
        (
            json!({ "items": vec![0; 1_000_001] }),
            "over the limit of 1000000",
        ),
        (
            json!({ "items": [{}, deep] }),
            "item 1 nests 65 levels deep",
        ),
        (
            json!({ "items": [{ "text": "x".repeat(17 << 20) }] }),
            "item 0 is 17825803 bytes, over the limit of 16777216 bytes",
        ),
        (
            json!({ "items": [{}], "idempotency_key": "k".repeat(257) }),
            "idempotency key",
        ),
    ];
    for (body, says) in refused {
        let (status, answer) = submit(&body);
        assert_eq!(status, 422, "{says}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{says}: {message}");
    }
    let scan = http
        .post(server.url("/v1/scans"))
        .json(&(0..70).fold(json!({}), |inner, _| json!({ "a": inner })))
        .send()
        .unwrap();
    assert_eq!(scan.status(), 422);

    // Nothing was accepted; the server answers, and starts again on the same store.
    let listed = get_json(&server, "/v1/jobs");
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 1, "{listed}");
    drop(server);
    let server = serve_eco_scan(&mock, data.path(), &admin);
    let again = job_status(&server, &job);
    assert_eq!(again["state"], "completed", "{again}");
}
