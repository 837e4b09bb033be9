use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use super::{Converted, ImportError, ImportOptions, NoteKind, convert};
use crate::config::{self, Environment};

/// The wizard's output of `examples/services/aws-autoscaler/aws_autoscaler.py`, with its defaults.
const FIXTURE: &str = include_str!("../../tests/fixtures/clearml_aws_autoscaler.json");

/// Secret values in `FIXTURE`.
const FIXTURE_SECRETS: [&str; 3] = [
    "fixture-git-token-4f1d0c9a7e",
    "AKIAFIXTUREKEY000001",
    "fixture-aws-secret-8b2e6f0d13",
];

struct TestEnvironment(BTreeMap<&'static str, &'static str>);

impl Environment for TestEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).map(|value| (*value).to_owned())
    }
}

fn options() -> ImportOptions {
    ImportOptions {
        cluster: "clearml".to_owned(),
        source_name: "aws_autoscaler.json".to_owned(),
    }
}

fn fixture() -> Value {
    serde_json::from_str(FIXTURE).unwrap()
}

fn convert_value(value: &Value) -> Result<Converted, ImportError> {
    convert(&value.to_string(), "input.json", &options())
}

fn problems(value: &Value) -> String {
    match convert_value(value) {
        Ok(converted) => panic!("converted:\n{}", converted.toml),
        Err(err) => err.to_string(),
    }
}

/// Parses the converted TOML after filling in its placeholders (server URL, prices, subnet ids) as an operator
/// would; check-config rejects the placeholders themselves.
fn checked(converted: &Converted) -> config::Config {
    let env = TestEnvironment(BTreeMap::from([
        ("CLEARML_API_ACCESS_KEY", "access"),
        ("CLEARML_API_SECRET_KEY", "secret"),
        ("FLEET_GIT_PASSWORD", "git-token"),
    ]));
    let filled = converted
        .toml
        .replace(
            "clearml-api-server.invalid",
            "clearml-api-server.example.com",
        )
        .replace(" = 0.0 }", " = 1.25 }")
        .replace("subnet-REPLACE-default-for-", "subnet-filled-in-for-");
    config::parse(&filled, "converted.toml", Path::new("."), &env)
        .unwrap_or_else(|err| panic!("{err}\n{filled}"))
}

fn parsed(converted: &Converted) -> toml::Table {
    converted.toml.parse().unwrap()
}

fn note_keys(converted: &Converted, kind: NoteKind) -> Vec<String> {
    converted
        .notes
        .iter()
        .filter(|note| note.kind == kind)
        .map(|note| note.key.clone())
        .collect()
}

#[test]
fn fixture_converts_to_valid_config() {
    let converted = convert(FIXTURE, "aws_autoscaler.json", &options()).unwrap();

    let config = checked(&converted);

    assert_eq!(config.cluster, "clearml");
    assert_eq!(config.policy.max_idle.as_secs(), 900);
    assert_eq!(config.policy.timeouts.boot.as_secs(), 1800);
    assert_eq!(config.clearml.poll_interval.as_secs(), 300);
    assert_eq!(config.aws.as_ref().unwrap().region, "us-east-1");
    assert!(config.etcd.is_none());
}

#[test]
fn queue_max_is_sum_of_caps() {
    let converted = convert_value(&fixture()).unwrap();
    let config = checked(&converted);

    let gpu = config
        .policy
        .queues
        .iter()
        .find(|queue| queue.name == "aws_4gpu_machines")
        .unwrap();
    assert_eq!(gpu.max_instances, 5);
    let order: Vec<&str> = gpu.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(order, ["aws4gpu_spot", "aws4gpu"]);
    assert_eq!(gpu.resources[0].max_instances, 3);
    assert_eq!(gpu.resources[1].max_instances, 2);
    assert_eq!(config.policy.cluster_max_instances, 10);
}

#[test]
fn resource_keys_carry_over() {
    let converted = convert_value(&fixture()).unwrap();
    let table = parsed(&converted);

    let spot = &table["resources"]["aws4gpu_spot"];
    assert_eq!(spot["market"].as_str(), Some("spot"));
    assert_eq!(spot["image_id"].as_str(), Some("ami-04c0416d6bd8e4b1f"));
    assert_eq!(
        spot["subnets"][0]["id"].as_str(),
        Some("subnet-0aaaaaaaaaaaaaaaa")
    );
    assert_eq!(spot["subnets"][0]["zone"].as_str(), Some("us-east-1a"));
    assert_eq!(spot["key_name"].as_str(), Some("clearml-autoscaler"));
    assert_eq!(spot["tags"]["team"].as_str(), Some("ml"));
    assert_eq!(spot["tags"]["project"].as_str(), Some("vision"));
    let volume = &spot["volumes"][0];
    assert_eq!(volume["device_name"].as_str(), Some("/dev/sda1"));
    assert_eq!(volume["size_gib"].as_integer(), Some(100));
    assert_eq!(volume["volume_type"].as_str(), Some("gp3"));
    assert_eq!(
        table["resources"]["aws4gpu"]["market"].as_str(),
        Some("on-demand")
    );
    assert_eq!(
        spot["hourly_price_usd"]["g4dn.4xlarge"].as_float(),
        Some(0.0)
    );
}

#[test]
fn zone_only_gets_placeholder_subnet() {
    let converted = convert_value(&fixture()).unwrap();
    let table = parsed(&converted);

    let subnet = &table["resources"]["aws4gpu"]["subnets"][0];
    assert_eq!(
        subnet["id"].as_str(),
        Some("subnet-REPLACE-default-for-us-east-1b")
    );
    assert_eq!(subnet["zone"].as_str(), Some("us-east-1b"));
    assert!(converted.toml.contains("TODO: replace the placeholder"));
    assert!(
        note_keys(&converted, NoteKind::Warning).contains(
            &"configurations.resource_configurations.aws4gpu.availability_zone".to_owned()
        )
    );
}

#[test]
fn invalid_resource_name_is_renamed() {
    let converted = convert_value(&fixture()).unwrap();
    let table = parsed(&converted);

    assert!(table["resources"].get("cpu-large").is_some());
    let cpu = table["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|queue| queue["name"].as_str() == Some("aws_cpu"))
        .unwrap();
    assert_eq!(cpu["resources"][0].as_str(), Some("cpu-large"));
}

#[test]
fn secrets_never_reach_output_or_notes() {
    let converted = convert_value(&fixture()).unwrap();
    let notes: Vec<String> = converted.notes.iter().map(ToString::to_string).collect();
    let notes = notes.join("\n");

    for secret in FIXTURE_SECRETS {
        assert!(!converted.toml.contains(secret), "{secret} in the TOML");
        assert!(!notes.contains(secret), "{secret} in the notes");
    }
    assert!(notes.contains("AWS_SECRET_ACCESS_KEY"), "{notes}");
    assert!(notes.contains("FLEET_GIT_PASSWORD"), "{notes}");
}

#[test]
fn dropped_settings_are_listed() {
    let converted = convert_value(&fixture()).unwrap();

    let dropped = note_keys(&converted, NoteKind::NotCarriedOver);
    for key in [
        "hyper_params.git_pass",
        "hyper_params.workers_prefix",
        "hyper_params.cloud_credentials_secret",
    ] {
        assert!(
            dropped.contains(&key.to_owned()),
            "{key} not in {dropped:?}"
        );
        assert!(
            converted.toml.contains(key),
            "{key} not in the TOML's comments"
        );
    }
}

#[test]
fn agent_settings_carry_over() {
    let converted = convert_value(&fixture()).unwrap();

    let config = checked(&converted);

    let agent = &config.agent;
    assert_eq!(
        agent.docker_image_for("aws4gpu"),
        "nvidia/cuda:10.1-runtime-ubuntu18.04"
    );
    assert_eq!(
        agent.init_script.as_ref().unwrap().expose(),
        "sudo apt-get install -y htop\necho 'vm ready'"
    );
    let git = agent.git.as_ref().unwrap();
    assert_eq!(git.user, "ml-bot");
    assert_eq!(git.password.expose(), "git-token");
    let warned = note_keys(&converted, NoteKind::Warning);
    assert!(warned.contains(&"configurations.extra_vm_bash_script".to_owned()));
    assert!(warned.contains(&"hyper_params.default_docker_image".to_owned()));
}

#[test]
fn extra_clearml_conf_without_credentials_carries_over() {
    let mut value = fixture();
    value["configurations"]["extra_clearml_conf"] = json!(
        "sdk.development.default_output_uri: \"s3://models/out\"\nagent.venvs_cache.max_entries: 5\n"
    );

    let config = checked(&convert_value(&value).unwrap());

    assert_eq!(
        config.agent.extra_clearml_conf.as_ref().unwrap().expose(),
        "sdk.development.default_output_uri: \"s3://models/out\"\nagent.venvs_cache.max_entries: 5"
    );
}

#[test]
fn poll_interval_clamps_with_warning() {
    let mut value = fixture();
    value["hyper_params"]["polling_interval_time_min"] = json!(10);
    value["hyper_params"]["max_idle_time_min"] = json!(0);

    let converted = convert_value(&value).unwrap();
    let config = checked(&converted);

    assert_eq!(config.clearml.poll_interval.as_secs(), 300);
    assert_eq!(config.policy.max_idle.as_secs(), 10);
    let warnings = note_keys(&converted, NoteKind::Warning);
    assert!(warnings.contains(&"hyper_params.polling_interval_time_min".to_owned()));
    assert!(warnings.contains(&"hyper_params.max_idle_time_min".to_owned()));
}

#[test]
fn fractional_poll_minutes_convert() {
    let mut value = fixture();
    value["hyper_params"]["polling_interval_time_min"] = json!(0.5);

    let converted = convert_value(&value).unwrap();

    assert_eq!(checked(&converted).clearml.poll_interval.as_secs(), 30);
}

#[test]
fn missing_region_comes_from_zone() {
    let mut value = fixture();
    value["hyper_params"]["cloud_credentials_region"] = Value::Null;

    let converted = convert_value(&value).unwrap();

    assert_eq!(checked(&converted).aws.unwrap().region, "us-east-1");
    assert!(
        note_keys(&converted, NoteKind::Warning)
            .contains(&"hyper_params.cloud_credentials_region".to_owned())
    );
}

#[test]
fn missing_timing_keys_use_clearml_defaults() {
    let mut value = fixture();
    let hyper = value["hyper_params"].as_object_mut().unwrap();
    hyper.remove("max_idle_time_min");
    hyper.remove("max_spin_up_time_min");

    let config = checked(&convert_value(&value).unwrap());

    assert_eq!(config.policy.max_idle.as_secs(), 900);
    assert_eq!(config.policy.timeouts.boot.as_secs(), 1800);
}

#[test]
fn clearml_conf_servers_carry_over() {
    let mut value = fixture();
    value["configurations"]["extra_clearml_conf"] = json!(
        "api {\n  api_server: \"https://api.ml.example.com\"\n  web_server: https://app.ml.example.com\n}\n\
         api.files_server = \"https://files.ml.example.com\"\n\
         api.credentials.secret_key = \"conf-secret-77aa\"\n"
    );

    let converted = convert_value(&value).unwrap();
    let config = checked(&converted);

    assert_eq!(config.clearml.api_server, "https://api.ml.example.com");
    assert_eq!(config.clearml.web_server, "https://app.ml.example.com");
    assert_eq!(config.clearml.files_server, "https://files.ml.example.com");
    assert!(!converted.toml.contains("conf-secret-77aa"));
    assert!(config.agent.extra_clearml_conf.is_none());
    let dropped = note_keys(&converted, NoteKind::NotCarriedOver);
    assert!(dropped.contains(&"configurations.extra_clearml_conf (credentials)".to_owned()));
}

#[test]
fn missing_server_gets_placeholder() {
    let converted = convert_value(&fixture()).unwrap();

    let table = parsed(&converted);

    assert_eq!(
        table["clearml"]["api_server"].as_str(),
        Some("https://clearml-api-server.invalid")
    );
    assert!(
        converted
            .toml
            .contains("TODO: set the URL of your ClearML API server")
    );
}

#[test]
fn iam_arn_wins_over_name() {
    let mut value = fixture();
    value["hyper_params"]["iam_arn"] = json!("arn:aws:iam::123456789012:instance-profile/clearml");
    value["hyper_params"]["iam_name"] = json!("clearml");

    let converted = convert_value(&value).unwrap();
    let table = parsed(&converted);

    let resource = &table["resources"]["aws4gpu"];
    assert_eq!(
        resource["instance_profile_arn"].as_str(),
        Some("arn:aws:iam::123456789012:instance-profile/clearml")
    );
    assert!(resource.get("instance_profile_name").is_none());
    checked(&converted);
}

#[test]
fn shared_tags_merge_under_resource_tags() {
    let mut value = fixture();
    value["hyper_params"]["tags"] = json!("team=platform, owner=ops");

    let table = parsed(&convert_value(&value).unwrap());

    let tags = &table["resources"]["aws4gpu_spot"]["tags"];
    assert_eq!(tags["team"].as_str(), Some("ml"));
    assert_eq!(tags["owner"].as_str(), Some("ops"));
    assert_eq!(
        table["resources"]["aws4gpu"]["tags"]["team"].as_str(),
        Some("platform")
    );
}

#[test]
fn unlisted_resource_gets_cap_of_one() {
    let mut value = fixture();
    value["configurations"]["queues"]["aws_cpu"] = json!([]);
    value["configurations"]["queues"]
        .as_object_mut()
        .unwrap()
        .remove("aws_cpu");

    let converted = convert_value(&value).unwrap();

    assert_eq!(
        parsed(&converted)["resources"]["cpu-large"]["max_instances"].as_integer(),
        Some(1)
    );
    checked(&converted);
}

#[test]
fn unknown_key_listed_without_value() {
    let mut value = fixture();
    value["hyper_params"]["mystery_token"] = json!("do-not-print-5521");

    let converted = convert_value(&value).unwrap();

    assert!(
        note_keys(&converted, NoteKind::NotCarriedOver)
            .contains(&"hyper_params.mystery_token".to_owned())
    );
    let notes: Vec<String> = converted.notes.iter().map(ToString::to_string).collect();
    assert!(!notes.join("\n").contains("do-not-print-5521"));
    assert!(!converted.toml.contains("do-not-print-5521"));
}

#[test]
fn missing_is_spot_names_key() {
    let mut value = fixture();
    value["configurations"]["resource_configurations"]["aws4gpu"]
        .as_object_mut()
        .unwrap()
        .remove("is_spot");

    let message = problems(&value);

    assert!(
        message.contains("configurations.resource_configurations.aws4gpu.is_spot = (missing)"),
        "{message}"
    );
}

#[test]
fn wrong_types_name_key_and_value() {
    let mut value = fixture();
    value["configurations"]["resource_configurations"]["aws4gpu"]["is_spot"] = json!("yes");
    value["hyper_params"]["max_idle_time_min"] = json!("fifteen");

    let message = problems(&value);

    assert!(
        message.contains(
            "configurations.resource_configurations.aws4gpu.is_spot = \"yes\": must be true or false"
        ),
        "{message}"
    );
    assert!(
        message.contains("hyper_params.max_idle_time_min = \"fifteen\": must be a number"),
        "{message}"
    );
}

#[test]
fn queue_with_unknown_resource_fails() {
    let mut value = fixture();
    value["configurations"]["queues"]["aws_cpu"] = json!([["cpu_xl", 2]]);

    let message = problems(&value);

    assert!(
        message.contains("configurations.queues.aws_cpu[0][0] = \"cpu_xl\": no such resource"),
        "{message}"
    );
}

#[test]
fn invalid_resource_is_not_reported_unknown() {
    let mut value = fixture();
    value["configurations"]["resource_configurations"]["aws4gpu"]["is_spot"] = json!("no");

    let message = problems(&value);

    assert!(message.contains("aws4gpu.is_spot = \"no\""), "{message}");
    assert!(!message.contains("no such resource"), "{message}");
}

#[test]
fn resource_in_two_queues_fails() {
    let mut value = fixture();
    value["configurations"]["queues"]["aws_cpu"] = json!([["cpu.large", 5], ["aws4gpu", 1]]);

    let message = problems(&value);

    assert!(message.contains("already listed in queue"), "{message}");
}

#[test]
fn zero_queue_cap_fails() {
    let mut value = fixture();
    value["configurations"]["queues"]["aws_cpu"] = json!([["cpu.large", 0]]);

    let message = problems(&value);

    assert!(
        message.contains(
            "configurations.queues.aws_cpu[0][1] = 0: must be a whole number of at least 1"
        ),
        "{message}"
    );
}

#[test]
fn string_queue_cap_reads_as_int() {
    let mut value = fixture();
    value["configurations"]["queues"]["aws_cpu"] = json!([["cpu.large", "4"]]);

    let table = parsed(&convert_value(&value).unwrap());

    assert_eq!(
        table["resources"]["cpu-large"]["max_instances"].as_integer(),
        Some(4)
    );
}

#[test]
fn other_cloud_provider_fails() {
    let mut value = fixture();
    value["hyper_params"]["cloud_provider"] = json!("GCP");

    let message = problems(&value);

    assert!(
        message.contains("hyper_params.cloud_provider = \"GCP\": only the AWS autoscaler"),
        "{message}"
    );
}

#[test]
fn malformed_tags_fail() {
    let mut value = fixture();
    value["configurations"]["resource_configurations"]["aws4gpu"]["tags"] =
        json!("team=ml, vision");

    let message = problems(&value);

    assert!(
        message.contains("configurations.resource_configurations.aws4gpu.tags = \"vision\""),
        "{message}"
    );
}

#[test]
fn subnet_without_zone_fails() {
    let mut value = fixture();
    value["configurations"]["resource_configurations"]["cpu.large"]
        .as_object_mut()
        .unwrap()
        .remove("availability_zone");

    let message = problems(&value);

    assert!(
        message.contains("cpu.large.availability_zone = (missing)"),
        "{message}"
    );
    assert!(
        message.contains("describe-subnets --subnet-ids"),
        "{message}"
    );
}

#[test]
fn snapshot_without_size_fails() {
    let mut value = fixture();
    let resource = &mut value["configurations"]["resource_configurations"]["aws4gpu"];
    resource["ebs_snapshot_id"] = json!("snap-0123456789abcdef0");
    resource.as_object_mut().unwrap().remove("ebs_volume_size");

    let message = problems(&value);

    assert!(
        message.contains("aws4gpu.ebs_volume_size = (missing)"),
        "{message}"
    );
}

#[test]
fn wrong_layout_fails() {
    let message = problems(&json!({"queues": {"default": []}}));

    assert!(
        message.contains("not a ClearML autoscaler configuration"),
        "{message}"
    );
}

#[test]
fn yaml_input_converts_as_json_does() {
    let yaml = include_str!("../../tests/fixtures/clearml_aws_autoscaler.yaml");

    let from_yaml = convert(yaml, "aws_autoscaler.yaml", &options()).unwrap();
    let from_json = convert(FIXTURE, "aws_autoscaler.json", &options()).unwrap();

    assert_eq!(from_yaml.toml, from_json.toml);
    assert_eq!(from_yaml.notes, from_json.notes);
}

#[test]
fn malformed_yaml_fails_naming_line_not_text() {
    let err = convert(
        "hyper_params:\n  cloud_credentials_secret: \"unterminated-secret-77\n",
        "a.yaml",
        &options(),
    )
    .unwrap_err();

    let message = err.to_string();
    assert!(
        message.starts_with("a.yaml is not valid YAML or JSON"),
        "{message}"
    );
    assert!(message.contains("line 2"), "{message}");
    assert!(!message.contains("unterminated-secret-77"), "{message}");
}

#[test]
fn invalid_cluster_option_fails() {
    let options = ImportOptions {
        cluster: "ML Prod".to_owned(),
        source_name: "a.json".to_owned(),
    };

    let message = convert(FIXTURE, "a.json", &options)
        .unwrap_err()
        .to_string();

    assert!(
        message.starts_with("invalid --cluster \"ML Prod\": use 1 to 63 lowercase letters"),
        "{message}"
    );
}
