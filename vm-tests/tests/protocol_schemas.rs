//! The JSON Schemas in docs/schemas describe the messages the Rust types
//! produce, and docs/protocol.md names every schema.
use serde_json::{json, Value};
use vm_tests::schema::{schemas_dir, Checker};
use xcp_vm_agent::protocol::{CheckIn, CheckInResponse, ErrorBody, ResultsAck, ResultsReport, PROTOCOL_VERSION};
use xcp_vm_agent::protocol::{Job, JobResult, Status};

fn checker() -> Checker {
    Checker::new(&schemas_dir())
}

fn sample_result(status: Status) -> JobResult {
    let mut r = JobResult::new(status, "script exited with 0")
        .with_details(json!({"exit_code": 0, "stdout": "hi\n", "stderr": "", "timed_out": false}));
    r.job_id = "5f0d6a0e-2b4c-4f7a-9e11-0c3d2b1a9f88".into();
    r.operation = "RunScript".into();
    r.started_at = 1_767_225_600;
    r.finished_at = 1_767_225_601;
    r.duration_ms = 412;
    r
}

fn sample_checkin() -> CheckIn {
    CheckIn {
        protocol_version: PROTOCOL_VERSION,
        agent_version: xcp_vm_agent::VERSION.into(),
        vm_uuid: "8e0c2a5e-41a7-4c44-9f6d-2b1a30a5c0de".into(),
        identity: serde_json::to_value(xcp_vm_agent::identity::current()).unwrap(),
        capabilities: vec!["RunScript".into()],
        metrics: serde_json::to_value(xcp_vm_agent::metrics::Sampler::default().sample()).unwrap(),
        network: serde_json::to_value(xcp_vm_agent::metrics::network()).unwrap(),
        inventory: Value::Null,
        wait_seconds: 25,
        pending_results: 0,
    }
}

#[test]
fn every_schema_is_valid_json_and_named_in_protocol_md() {
    let doc = std::fs::read_to_string(schemas_dir().join("../protocol.md")).unwrap();
    let mut n = 0;
    for e in std::fs::read_dir(schemas_dir()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.ends_with(".json"), "unexpected file {name} in docs/schemas");
        let v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(v["title"].is_string() && v["description"].is_string(), "{name} needs a title and a description");
        assert!(doc.contains(&format!("schemas/{name}")), "docs/protocol.md does not link schemas/{name}");
        // The checker accepts the schema's keywords (it errors on unknown ones).
        checker().check(&name, &json!(null)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        n += 1;
    }
    assert!(n >= 14, "expected at least 14 schemas, found {n}");
}

#[test]
fn protocol_messages_match_their_schemas() {
    let c = checker();
    c.validate("checkin-request.json", &serde_json::to_value(sample_checkin()).unwrap()).unwrap();
    let job = Job { id: "j1".into(), operation: "RunScript".into(), params: json!({"script": "true"}) };
    c.validate("job.json", &serde_json::to_value(&job).unwrap()).unwrap();
    let resp = CheckInResponse { jobs: vec![job], server_time: 1 };
    c.validate("checkin-response.json", &serde_json::to_value(&resp).unwrap()).unwrap();
    c.validate("checkin-response.json", &serde_json::to_value(CheckInResponse::default()).unwrap()).unwrap();
    for st in
        [Status::Running, Status::Succeeded, Status::NoChange, Status::Refused, Status::Failed, Status::Interrupted]
    {
        c.validate("job-result.json", &serde_json::to_value(sample_result(st)).unwrap()).unwrap();
    }
    let report = ResultsReport { vm_uuid: "u".into(), results: vec![sample_result(Status::Succeeded)] };
    c.validate("results-report.json", &serde_json::to_value(&report).unwrap()).unwrap();
    let ack = ResultsAck { acknowledged: vec!["j1".into()] };
    c.validate("results-ack.json", &serde_json::to_value(&ack).unwrap()).unwrap();
    c.validate("error.json", &serde_json::to_value(ErrorBody { error: "x".into() }).unwrap()).unwrap();
}

#[test]
fn schemas_reject_what_the_protocol_forbids() {
    let c = checker();
    let mut r = serde_json::to_value(sample_result(Status::Succeeded)).unwrap();
    r["status"] = json!("done");
    assert!(!c.check("job-result.json", &r).unwrap().is_empty(), "an unknown status must not validate");
    let mut r = serde_json::to_value(sample_result(Status::Succeeded)).unwrap();
    r.as_object_mut().unwrap().remove("job_id");
    assert!(!c.check("job-result.json", &r).unwrap().is_empty(), "a result without job_id must not validate");
    let extra = json!({"id": "j", "operation": "RunScript", "params": {}, "priority": 1});
    assert!(!c.check("job.json", &extra).unwrap().is_empty(), "a v1 server sends no extra job fields");
    // ... and the agent ignores one a later server adds (docs/protocol.md: Compatibility).
    let job: Job = serde_json::from_value(extra).expect("the agent reads a job with an extra field");
    assert_eq!((job.id.as_str(), job.operation.as_str()), ("j", "RunScript"));
    let mut ci = serde_json::to_value(sample_checkin()).unwrap();
    ci["wait_seconds"] = json!("10");
    assert!(!c.check("checkin-request.json", &ci).unwrap().is_empty());
    ci["wait_seconds"] = json!(10);
    ci["metrics"].as_object_mut().unwrap().remove("process_count");
    assert!(!c.check("checkin-request.json", &ci).unwrap().is_empty(), "every metric name is required");
}

#[test]
fn job_files_deserialize_like_server_jobs() {
    // The job a server sends and a job file for `exec --job` are one format.
    let text = r#"{"id": "j1", "operation": "RunScript", "params": {"script": "echo hi"}}"#;
    let j: Job = serde_json::from_str(text).unwrap();
    checker().validate("job.json", &serde_json::to_value(&j).unwrap()).unwrap();
    // A field a later protocol version adds is ignored, not a reason to refuse.
    let later: Job = serde_json::from_str(r#"{"id": "j1", "operation": "RunScript", "priority": 1}"#).unwrap();
    assert_eq!((later.id.as_str(), later.operation.as_str()), ("j1", "RunScript"));
    assert!(serde_json::from_str::<Job>(r#"{"operation": "RunScript"}"#).is_err(), "a job needs an id");
}
