//! kv namespaces reload without a restart: the reward stage's character catalog (kv
//! `characters`, read by the `character-match` handler) changes when its file changes, and on
//! the admin call; a broken file is refused and the old entries keep serving. In Redis mode a
//! reload on one node is served by every node.

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use stagehand_tests::backends::Backend;
use stagehand_tests::{
    MockLlm, Server, client, eco_scan_pipeline, job_results, repo_root, submit_scan, wait_for_job,
    wait_until,
};

const TOKEN: &str = "kv-admin-token";

/// The character catalog with recyclable/plastic's character renamed.
fn catalog(plastic: &str) -> String {
    let text =
        std::fs::read_to_string(repo_root().join("examples/eco-scan/characters.json")).unwrap();
    let mut catalog: Value = serde_json::from_str(&text).unwrap();
    catalog["recyclable/plastic"] = json!({ "id": format!("char-{plastic}"), "name": plastic });
    catalog.to_string()
}

/// Scan a PET bottle; the name of the character the reward stage found.
fn scanned_character(server: &Server) -> String {
    let task = submit_scan(
        server,
        json!({ "user_id": "u1", "image_url": "https://img.example/pet_bottle.jpg" }),
    );
    wait_for_job(server, &task);
    job_results(server, &task)[0]["output"]["reward"]["character"]["name"]
        .as_str()
        .unwrap_or_else(|| panic!("a character in {:?}", job_results(server, &task)))
        .to_string()
}

fn characters_namespace(server: &Server) -> Value {
    let all: Value = client()
        .get(server.url("/v1/kv"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    all["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "characters")
        .unwrap()
        .clone()
}

fn reload(server: &Server, namespace: &str, token: Option<&str>) -> (StatusCode, Value) {
    let mut request = client().post(server.url(&format!("/v1/kv/{namespace}/reload")));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().unwrap();
    let status = response.status();
    (status, response.json().unwrap_or(Value::Null))
}

#[test]
fn the_character_catalog_reloads_on_file_change_and_on_request() {
    let mock = MockLlm::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let characters = dir.path().join("characters.json");
    std::fs::write(&characters, catalog("Petty")).unwrap();
    let pipeline = eco_scan_pipeline(dir.path(), |text| {
        let shipped = format!(
            "{}/examples/eco-scan/characters.json",
            repo_root().display()
        );
        text.replace(&shipped, &characters.display().to_string())
    });
    let server = stagehand_tests::serve(
        &pipeline,
        &dir.path().join("data"),
        Some(&mock),
        &["--admin-token", TOKEN],
    );
    assert_eq!(scanned_character(&server), "Petty");
    let first = characters_namespace(&server);
    assert_eq!(first["reloads"], 0);

    // Change the file: the server notices and swaps the catalog in.
    write_atomically(&characters, &catalog("Petty II"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while characters_namespace(&server)["digest"] == first["digest"] {
        assert!(
            Instant::now() < deadline,
            "the file change was not picked up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(scanned_character(&server), "Petty II");

    // A broken file is refused, by the watcher and by the admin call; the old catalog stays.
    let before = characters_namespace(&server);
    std::fs::write(&characters, "{ not json").unwrap();
    let (status, body) = reload(&server, "characters", Some(TOKEN));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("is not JSON") && message.contains("the old entries stay in use"),
        "{message}"
    );
    // The watcher's refusal is counted: wait for it, then check that nothing changed.
    stagehand_tests::wait_for_metric(
        &server,
        "stagehand_watched_changes_refused_total{kind=\"kv\",name=\"characters\"}",
        1.0,
    );
    assert_eq!(characters_namespace(&server)["digest"], before["digest"]);
    assert_eq!(scanned_character(&server), "Petty II");

    // The admin call: needs the token, names unknown namespaces, reloads at once.
    std::fs::write(&characters, catalog("Petty III")).unwrap();
    assert_eq!(
        reload(&server, "characters", None).0,
        StatusCode::UNAUTHORIZED
    );
    let (status, body) = reload(&server, "no_such", Some(TOKEN));
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = reload(&server, "characters", Some(TOKEN));
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["entries"], first["entries"]);
    assert_ne!(body["digest"], before["digest"]);
    assert_eq!(scanned_character(&server), "Petty III");
}

/// Replace a file the way deploy tools do: write a sibling, rename it over.
fn write_atomically(path: &Path, text: &str) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

/// Redis mode: a reload on one node (its watcher seeing its file change, or the admin call) is
/// served by every node, each with a file of its own, and by a node started later.
#[test]
fn a_reload_on_one_node_is_served_by_every_node() {
    let mock = MockLlm::start(&[]);
    let backend = Backend::redis();
    let dir = tempfile::tempdir().unwrap();
    let node = |name: &str| {
        let files = dir.path().join(name);
        std::fs::create_dir_all(&files).unwrap();
        let characters = files.join("characters.json");
        std::fs::write(&characters, catalog("Petty")).unwrap();
        // Relative to the pipeline file: every node's pipeline file reads the same, so the
        // nodes serve one revision.
        let pipeline = eco_scan_pipeline(&files, |text| {
            let shipped = format!(
                "{}/examples/eco-scan/characters.json",
                repo_root().display()
            );
            text.replace(&shipped, "characters.json")
        });
        let server = stagehand_tests::serve(
            &pipeline,
            &files.join("data"),
            Some(&mock),
            &backend.flags(&["--admin-token", TOKEN]),
        );
        (server, characters)
    };
    let (a, a_file) = node("a");
    let (b, b_file) = node("b");
    assert_eq!(scanned_character(&b), "Petty");

    // A's file changes: A's watcher reloads it, and B serves A's content.
    let first = characters_namespace(&a)["digest"].clone();
    write_atomically(&a_file, &catalog("Petty II"));
    wait_until("the first node reloads its file", || {
        characters_namespace(&a)["digest"] != first
    });
    let digest = characters_namespace(&a)["digest"].clone();
    wait_until("the other node serves the reloaded content", || {
        characters_namespace(&b)["digest"] == digest
    });
    assert_eq!(scanned_character(&b), "Petty II");
    assert_eq!(
        std::fs::read_to_string(&b_file).unwrap(),
        catalog("Petty"),
        "B's own file is untouched"
    );

    // The admin call on B, after its file changed: A follows.
    std::fs::write(&b_file, catalog("Petty III")).unwrap();
    let (status, body) = reload(&b, "characters", Some(TOKEN));
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_until("the first node serves the second reload", || {
        characters_namespace(&a)["digest"] == body["digest"]
    });
    assert_eq!(scanned_character(&a), "Petty III");

    // A node started later, its file as at the start, serves the cluster's content at once.
    let (c, _) = node("c");
    assert_eq!(characters_namespace(&c)["digest"], body["digest"]);
    assert_eq!(scanned_character(&c), "Petty III");
}
