//! Bearer tokens over real HTTP: the optional API token guards every route (metrics included),
//! the admin token guards changes and passes everywhere, a cookie authorizes reads only.

use reqwest::StatusCode;
use reqwest::blocking::RequestBuilder;
use serde_json::json;
use stagehand_tests::{MockLlm, Server, client, eco_items, serve_eco_scan};

const API: &str = "api-token-for-clients";
const ADMIN: &str = "admin-token-for-operators";

fn status(request: RequestBuilder) -> StatusCode {
    request.send().unwrap().status()
}

fn with_tokens(mock: &MockLlm, data: &std::path::Path) -> Server {
    serve_eco_scan(mock, data, &["--api-token", API, "--admin-token", ADMIN])
}

/// Every operation of `/openapi.json`, walked: each declares a security requirement; without a
/// token each is a 401; with the API token each admin operation is a 401 or 403 and every
/// other passes the guard. A route added without the guard, or documented without security,
/// fails here.
#[test]
fn every_documented_operation_is_guarded_as_its_document_says() {
    let mock = MockLlm::start(&["--latency-ms", "0"]);
    let data = tempfile::tempdir().unwrap();
    let server = with_tokens(&mock, data.path());
    let http = client();
    let document: serde_json::Value = http
        .get(server.url("/openapi.json"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let job = uuid::Uuid::now_v7().to_string();
    let mut checked = 0;
    for (path, item) in document["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{id}", &job)
            .replace("{job}", &job)
            .replace("{index}", "0")
            .replace("{name}", "answer")
            .replace("{namespace}", "characters");
        for (method, operation) in item.as_object().unwrap() {
            let what = format!("{} {path}", method.to_uppercase());
            let schemes: Vec<&str> = operation["security"]
                .as_array()
                .unwrap_or_else(|| panic!("{what} declares no security"))
                .iter()
                .flat_map(|requirement| requirement.as_object().unwrap().keys())
                .map(String::as_str)
                .collect();
            assert!(schemes.contains(&"admin_token"), "{what}: {schemes:?}");
            let admin_only = !schemes.contains(&"api_token");
            let method: reqwest::Method = method.to_uppercase().parse().unwrap();
            let request = || http.request(method.clone(), server.url(&concrete));
            assert_eq!(
                status(request()),
                StatusCode::UNAUTHORIZED,
                "{what} without a token"
            );
            let with_api = status(request().bearer_auth(API));
            if admin_only {
                assert!(
                    [StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN].contains(&with_api),
                    "{what} with the API token: {with_api}"
                );
            } else {
                assert!(
                    ![StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN].contains(&with_api),
                    "{what} with the API token: {with_api}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 21, "{checked} operations");
}

#[test]
fn every_route_needs_the_api_token_and_changes_need_the_admin_token() {
    let mock = MockLlm::start(&["--latency-ms", "0"]);
    let data = tempfile::tempdir().unwrap();
    let server = with_tokens(&mock, data.path());
    let http = client();

    // Reads and submissions: no token or a wrong one is a 401; either token passes.
    for path in [
        "/v1/jobs",
        "/v1/stages",
        "/v1/kv",
        "/v1/dead-letters",
        "/metrics",
    ] {
        assert_eq!(
            status(http.get(server.url(path))),
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
        assert_eq!(
            status(http.get(server.url(path)).bearer_auth("nope")),
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
        assert_eq!(
            status(http.get(server.url(path)).bearer_auth(API)),
            StatusCode::OK,
            "{path}"
        );
        assert_eq!(
            status(http.get(server.url(path)).bearer_auth(ADMIN)),
            StatusCode::OK,
            "{path}"
        );
    }
    let submit = || {
        http.post(server.url("/v1/jobs"))
            .json(&json!({ "items": eco_items(1) }))
    };
    assert_eq!(status(submit()), StatusCode::UNAUTHORIZED);
    let accepted = submit().bearer_auth(API).send().unwrap();
    assert_eq!(accepted.status(), StatusCode::ACCEPTED);
    let body: serde_json::Value = accepted.json().unwrap();
    let job = body["job_id"].as_str().unwrap().to_string();

    // The error says what is missing.
    let refused: serde_json::Value = http
        .get(server.url("/v1/jobs"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(refused["error"]["code"], "unauthorized", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bearer token"),
        "{refused}"
    );

    // A cookie authorizes reads (the dashboard's EventSource) but never a change.
    let cookie = format!("theme=dark; stagehand_token={API}");
    let events = http
        .get(server.url(&format!("/v1/jobs/{job}/events")))
        .header("cookie", &cookie);
    assert_eq!(status(events), StatusCode::OK);
    let cancel = || http.post(server.url(&format!("/v1/jobs/{job}/cancel")));
    assert_eq!(
        status(cancel().header("cookie", &cookie)),
        StatusCode::UNAUTHORIZED
    );
    // 202 while it runs, 200 once it has ended: either way, authorized.
    assert!(status(cancel().bearer_auth(API)).is_success());

    // Admin routes: the API token is not enough.
    let rollback = || http.post(server.url("/v1/stages/rule/rollback"));
    assert_eq!(status(rollback()), StatusCode::UNAUTHORIZED);
    assert_eq!(
        status(rollback().bearer_auth(API)),
        StatusCode::UNAUTHORIZED
    );
    // Nothing to roll back to, but authorized.
    assert_eq!(status(rollback().bearer_auth(ADMIN)), StatusCode::CONFLICT);
    let reprocess = || http.post(server.url(&format!("/v1/jobs/{job}/reprocess")));
    assert_eq!(
        status(reprocess().bearer_auth(API)),
        StatusCode::UNAUTHORIZED
    );
    let discard = || http.delete(server.url(&format!("/v1/dead-letters/{job}/0")));
    assert_eq!(status(discard().bearer_auth(API)), StatusCode::UNAUTHORIZED);
    assert_eq!(status(discard().bearer_auth(ADMIN)), StatusCode::NOT_FOUND);
}

#[test]
fn without_tokens_reads_are_open_and_admin_routes_are_off() {
    let mock = MockLlm::start(&["--latency-ms", "0"]);
    let data = tempfile::tempdir().unwrap();
    let server = serve_eco_scan(&mock, data.path(), &[]);
    let http = client();
    assert_eq!(status(http.get(server.url("/metrics"))), StatusCode::OK);
    assert_eq!(status(http.get(server.url("/v1/jobs"))), StatusCode::OK);
    let job = uuid::Uuid::now_v7();
    for request in [
        http.post(server.url("/v1/stages/rule/rollback")),
        http.post(server.url(&format!("/v1/jobs/{job}/reprocess"))),
        http.delete(server.url(&format!("/v1/dead-letters/{job}/0"))),
        http.post(server.url("/v1/kv/characters/reload")),
    ] {
        let response = request.bearer_auth("anything").send().unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let body: serde_json::Value = response.json().unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--admin-token"),
            "{body}"
        );
    }
}
