//! `/openapi.json` describes the real routes: every documented operation is answered by its
//! handler (never the fallback's "no such route", never 405), and the document names the
//! security schemes. (`cargo xtask schemathesis` then checks the answers against the schemas.)

use reqwest::Method;
use stagehand_tests::{MockLlm, client, get_json, serve_eco_scan};

#[test]
fn every_documented_operation_is_a_real_route() {
    let mock = MockLlm::start(&["--latency-ms", "0"]);
    let data = tempfile::tempdir().unwrap();
    let server = serve_eco_scan(&mock, data.path(), &["--admin-token", "openapi-admin"]);
    let http = client();
    let document = get_json(&server, "/openapi.json");
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));
    let schemes = &document["components"]["securitySchemes"];
    assert_eq!(schemes["api_token"]["scheme"], "bearer", "{schemes}");
    assert_eq!(schemes["admin_token"]["scheme"], "bearer", "{schemes}");

    let paths = document["paths"].as_object().unwrap();
    assert!(paths.len() >= 19, "{:?}", paths.keys());
    let job = uuid::Uuid::now_v7().to_string();
    let mut operations = 0;
    for (path, item) in paths {
        let concrete = path
            .replace("{id}", &job)
            .replace("{job}", &job)
            .replace("{index}", "0")
            .replace("{name}", "answer")
            .replace("{namespace}", "characters");
        for method in item.as_object().unwrap().keys() {
            let method: Method = method.to_uppercase().parse().unwrap();
            let response = http
                .request(method.clone(), server.url(&concrete))
                .bearer_auth("openapi-admin")
                .send()
                .unwrap();
            let status = response.status();
            let body = response.text().unwrap();
            assert_ne!(status, 405, "{method} {path} is documented but not routed");
            assert!(
                !body.contains("no such route"),
                "{method} {path} is documented but not routed: {body}"
            );
            assert!(status.as_u16() < 500, "{method} {path}: {status} {body}");
            operations += 1;
        }
    }
    assert!(operations >= 21, "{operations}");
}
