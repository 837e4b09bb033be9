use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use super::*;

const SECRET: &str = "s3cr3t-value-never-printed";

struct FakeEnvironment(HashMap<&'static str, &'static str>);

impl Environment for FakeEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).map(|value| value.to_string())
    }
}

fn env() -> FakeEnvironment {
    FakeEnvironment(HashMap::from([
        ("CLEARML_API_ACCESS_KEY", "ACCESS"),
        ("CLEARML_API_SECRET_KEY", SECRET),
        ("FLEET_OPERATOR_TOKEN", "operator-token"),
        ("FLEET_BOOTSTRAP_KEY", "0123456789abcdef0123456789abcdef"),
        ("FLEET_GIT_TOKEN", "git-token-never-printed"),
        ("TASKS_AWS_ACCESS_KEY_ID", "AKIATASKS0000000"),
    ]))
}

const VALID: &str = r#"
[cluster]
name = "prod"
replica_id = "coordinator-0"

[etcd]
endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"]

[clearml]
api_server = "https://api.clear.ml"

[defaults]
max_idle_seconds = 600

[budget]
hourly_usd = 25.0
max_instances = 40

[api]
grpc_listen = "0.0.0.0:7443"
bootstrap_key_env = "FLEET_BOOTSTRAP_KEY"

[[api.tokens]]
name = "ops"
role = "operator"
token_env = "FLEET_OPERATOR_TOKEN"

[aws]
region = "us-east-1"

[resources.gpu-spot]
provider = "aws"
max_instances = 10
image_id = "ami-0abc1234"
instance_types = ["g5.xlarge", "g4dn.xlarge"]
subnets = [{ id = "subnet-a", zone = "us-east-1a" }, { id = "subnet-b", zone = "us-east-1b" }]
market = "spot"
hourly_price_usd = { "g5.xlarge" = 0.45, "g4dn.xlarge" = 0.30 }

[resources.gpu-on-demand]
provider = "aws"
max_instances = 4
image_id = "ami-0abc1234"
instance_types = ["g5.xlarge"]
subnets = [{ id = "subnet-a", zone = "us-east-1a" }]
hourly_price_usd = { "g5.xlarge" = 1.01 }

[[queues]]
name = "gpu"
resources = ["gpu-spot", "gpu-on-demand"]
max_instances = 12
min_idle = 1
"#;

fn parse_text(text: &str) -> Result<Config, ConfigError> {
    parse(text, "test.toml", Path::new("."), &env())
}

fn problems(text: &str) -> Vec<Problem> {
    match parse_text(text) {
        Err(ConfigError::Invalid { problems, .. }) => problems,
        other => panic!("expected invalid settings, got {other:?}"),
    }
}

fn problem_for<'a>(problems: &'a [Problem], key: &str) -> &'a Problem {
    problems
        .iter()
        .find(|problem| problem.key == key)
        .unwrap_or_else(|| panic!("no problem for {key} in {problems:#?}"))
}

#[test]
fn https_agent_endpoints_need_tls() {
    let text = VALID.replace(
        "bootstrap_key_env = \"FLEET_BOOTSTRAP_KEY\"",
        "bootstrap_key_env = \"FLEET_BOOTSTRAP_KEY\"\nagent_endpoints = [\"https://coordinator-0:7443\"]",
    );
    let problems = problems(&text);
    let problem = problem_for(&problems, "api.agent_endpoints[0]");
    assert!(problem.message.contains("api.tls_cert_file"), "{problem}");
}

#[test]
fn valid_file_builds_policy_and_providers() {
    let config = parse_text(VALID).unwrap();

    assert_eq!(config.cluster, "prod");
    assert_eq!(config.replica_id, "coordinator-0");
    assert_eq!(config.policy.max_idle, Duration::from_secs(600));
    assert_eq!(config.policy.hourly_budget_usd, Some(25.0));
    assert_eq!(config.policy.cluster_max_instances, 40);
    let queue = config.policy.queue("gpu").unwrap();
    assert_eq!(queue.min_idle, 1);
    let names: Vec<&str> = queue.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["gpu-spot", "gpu-on-demand"],
        "priority order is kept"
    );
    let spot = &queue.resources[0];
    assert_eq!(spot.offerings.len(), 4, "2 instance types x 2 subnets");
    assert_eq!(spot.offerings[0].id, "g5.xlarge/us-east-1a/spot");
    assert_eq!(spot.offerings[0].hourly_price_usd, 0.45);
    let etcd = config.etcd.unwrap();
    assert_eq!(etcd.election.election_key, "/clearml-fleet/prod/leader");
    assert_eq!(etcd.election.lease_ttl, Duration::from_secs(5));
    assert_eq!(etcd.key_prefix, "/clearml-fleet/prod/");
    assert_eq!(config.clearml.secret_key.expose(), SECRET);
    assert_eq!(config.clearml.web_server, "https://api.clear.ml");
    assert_eq!(config.api.tokens[0].role, Role::Operator);
    let aws = config.aws.unwrap();
    assert_eq!(aws.region, "us-east-1");
    assert_eq!(aws.resources.len(), 2);
}

#[test]
fn unknown_key_is_syntax_error_naming_it() {
    let text = VALID.replace("max_idle_seconds = 600", "max_idle_secs = 600");

    let err = parse_text(&text).unwrap_err();

    let message = err.to_string();
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
    assert!(message.contains("max_idle_secs"), "{message}");
    assert!(
        message.contains("max_idle_seconds"),
        "the message lists the valid keys: {message}"
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = VALID
        .replace("max_instances = 12", "max_instances = 0")
        .replace("hourly_usd = 25.0", "hourly_usd = -1.0")
        .replace(
            "grpc_listen = \"0.0.0.0:7443\"",
            "grpc_listen = \"everywhere\"",
        );

    let problems = problems(&text);

    // min_idle = 1 now exceeds max_instances = 0, which is a fourth problem.
    assert_eq!(problems.len(), 4, "{problems:#?}");
    assert_eq!(problem_for(&problems, "queues[0].max_instances").value, "0");
    assert_eq!(problem_for(&problems, "queues[0].min_idle").value, "1");
    assert!(
        problem_for(&problems, "budget.hourly_usd")
            .message
            .contains("positive")
    );
    let listen = problem_for(&problems, "api.grpc_listen");
    assert_eq!(listen.value, "\"everywhere\"");
    assert!(
        listen.message.contains("0.0.0.0:7443"),
        "the fix shows an example: {listen}"
    );
}

#[test]
fn queue_with_unknown_resource_lists_known_ones() {
    let text = VALID.replace(
        "resources = [\"gpu-spot\", \"gpu-on-demand\"]",
        "resources = [\"gpu-spto\"]",
    );

    let problems = problems(&text);

    let problem = problem_for(&problems, "queues[0].resources");
    assert_eq!(problem.value, "\"gpu-spto\"");
    assert!(problem.message.contains("gpu-spot"), "{problem}");
}

#[test]
fn missing_price_names_instance_type() {
    let text = VALID.replace(
        "hourly_price_usd = { \"g5.xlarge\" = 0.45, \"g4dn.xlarge\" = 0.30 }",
        "hourly_price_usd = { \"g5.xlarge\" = 0.45 }",
    );

    let problems = problems(&text);

    let problem = problem_for(&problems, "resources.gpu-spot.hourly_price_usd");
    assert!(problem.value.contains("g4dn.xlarge"), "{problem}");
}

#[test]
fn aws_key_on_local_resource_is_rejected() {
    let text = format!(
        "{VALID}\n[local]\nbase_dir = \"/tmp/fleet\"\nprogram = \"/usr/bin/fleet-node-agent\"\n\n[resources.box]\nprovider = \"local\"\nmax_instances = 2\nimage_id = \"ami-1\"\n"
    );

    let problems = problems(&text);

    let problem = problem_for(&problems, "resources.box.image_id");
    assert!(problem.message.contains("\"aws\" only"), "{problem}");
}

#[test]
fn missing_secret_names_variable_not_value() {
    let empty = FakeEnvironment(HashMap::from([("CLEARML_API_ACCESS_KEY", "ACCESS")]));

    let err = parse(VALID, "test.toml", Path::new("."), &empty).unwrap_err();

    let message = err.to_string();
    assert!(message.contains("CLEARML_API_SECRET_KEY"), "{message}");
    assert!(message.contains("FLEET_OPERATOR_TOKEN"), "{message}");
    assert!(!message.contains(SECRET), "{message}");
}

#[test]
fn secret_key_file_is_read_and_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("clearml.secret"), "from-file\n").unwrap();
    let text = VALID.replace(
        "api_server = \"https://api.clear.ml\"",
        "api_server = \"https://api.clear.ml\"\nsecret_key_file = \"clearml.secret\"",
    );

    let config = parse(&text, "test.toml", dir.path(), &env()).unwrap();

    assert_eq!(config.clearml.secret_key.expose(), "from-file");
    assert_eq!(format!("{:?}", config.clearml.secret_key), "Secret(***)");
}

#[test]
fn unreadable_secret_file_names_path() {
    let text = VALID.replace(
        "api_server = \"https://api.clear.ml\"",
        "api_server = \"https://api.clear.ml\"\nsecret_key_file = \"/nonexistent/clearml.secret\"",
    );

    let problems = problems(&text);

    let problem = problem_for(&problems, "clearml.secret_key_file");
    assert_eq!(problem.value, "/nonexistent/clearml.secret");
    assert!(
        problem.message.contains("cannot read the file"),
        "{problem}"
    );
}

#[test]
fn tls_needs_certificate_and_key() {
    let text = VALID.replace(
        "grpc_listen = \"0.0.0.0:7443\"",
        "grpc_listen = \"0.0.0.0:7443\"\ntls_cert_file = \"/etc/fleet/tls.crt\"",
    );

    let problems = problems(&text);

    let problem = problem_for(&problems, "api.tls_key_file");
    assert!(problem.message.contains("both"), "{problem}");
}

#[test]
fn min_idle_above_max_is_rejected() {
    let text = VALID.replace("min_idle = 1", "min_idle = 13");

    let problems = problems(&text);

    let problem = problem_for(&problems, "queues[0].min_idle");
    assert_eq!(problem.value, "13");
    assert!(problem.message.contains("max_instances (12)"), "{problem}");
}

#[test]
fn lease_ttl_out_of_range_is_rejected() {
    let text = VALID.replace("endpoints = [", "lease_ttl_seconds = 1\nendpoints = [");

    let problems = problems(&text);

    let problem = problem_for(&problems, "etcd.lease_ttl_seconds");
    assert_eq!(
        problem.to_string(),
        "etcd.lease_ttl_seconds = 1: must be between 2 and 60 seconds"
    );
}

#[test]
fn resource_validation_message_reads_as_sentence() {
    let text = VALID
        .replace(
            "market = \"spot\"\n",
            "market = \"spot\"\nspot_max_price = \"0.5\"\n",
        )
        .replace(
            "hourly_price_usd = { \"g5.xlarge\" = 1.01 }",
            "hourly_price_usd = { \"g5.xlarge\" = 1.01 }\nspot_max_price = \"0.9\"",
        );

    let problems = problems(&text);

    let problem = problem_for(&problems, "resources.gpu-on-demand.spot_max_price");
    assert!(
        problem
            .to_string()
            .starts_with("resources.gpu-on-demand.spot_max_price is set but"),
        "{problem}"
    );
}

#[test]
fn agent_section_reaches_settings() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("init.sh"), "apt-get install -y htop\n").unwrap();
    let text = format!(
        "{VALID}\n[agent]\ndocker_image = \"nvidia/cuda:12.4.1-runtime-ubuntu22.04\"\n\
         extra_clearml_conf = \"sdk.development.default_output_uri: s3://bucket/out\"\n\
         init_script_file = \"init.sh\"\ngit_user = \"ci-bot\"\ngit_password_env = \"FLEET_GIT_TOKEN\"\n\
         task_env = {{ AWS_ACCESS_KEY_ID = \"TASKS_AWS_ACCESS_KEY_ID\" }}\n"
    )
    .replace(
        "hourly_price_usd = { \"g5.xlarge\" = 1.01 }",
        "hourly_price_usd = { \"g5.xlarge\" = 1.01 }\ndocker_image = \"pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime\"",
    );

    let config = parse(&text, "test.toml", dir.path(), &env()).unwrap();

    let agent = &config.agent;
    assert_eq!(
        agent.docker_image_for("gpu-spot"),
        "nvidia/cuda:12.4.1-runtime-ubuntu22.04"
    );
    assert_eq!(
        agent.docker_image_for("gpu-on-demand"),
        "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"
    );
    assert_eq!(
        agent.init_script.as_ref().unwrap().expose(),
        "apt-get install -y htop\n"
    );
    assert!(agent.extra_clearml_conf.is_some());
    let git = agent.git.as_ref().unwrap();
    assert_eq!(git.user, "ci-bot");
    assert_eq!(git.password.expose(), "git-token-never-printed");
    assert_eq!(
        agent.task_env["AWS_ACCESS_KEY_ID"].expose(),
        "AKIATASKS0000000"
    );
    let debug = format!("{config:?}");
    assert!(!debug.contains("git-token-never-printed"), "{debug}");
    assert!(!debug.contains("AKIATASKS0000000"), "{debug}");
}

#[test]
fn agent_section_errors_name_keys() {
    let text = format!(
        "{VALID}\n[agent]\ndocker_image = \"my image\"\n\
         init_script = \"echo hi\"\ninit_script_file = \"init.sh\"\n\
         extra_clearml_conf_file = \"/nonexistent/extra.conf\"\n\
         git_user = \"ci-bot\"\n\
         task_env = {{ HOME = \"TASKS_HOME\", 1BAD = \"X\", AWS_SECRET_ACCESS_KEY = \"UNSET_VARIABLE\" }}\n"
    );

    let problems = problems(&text);

    let image = problem_for(&problems, "agent.docker_image");
    assert!(image.message.contains("docker image reference"), "{image}");
    let script = problem_for(&problems, "agent.init_script_file");
    assert!(script.message.contains("not both"), "{script}");
    let conf = problem_for(&problems, "agent.extra_clearml_conf_file");
    assert_eq!(conf.value, "/nonexistent/extra.conf");
    let git = problem_for(&problems, "agent.git_password_env");
    assert!(git.message.contains("needs a password"), "{git}");
    let home = problem_for(&problems, "agent.task_env.HOME");
    assert!(home.message.contains("sets HOME"), "{home}");
    let name = problem_for(&problems, "agent.task_env.1BAD");
    assert!(name.message.contains("not a variable name"), "{name}");
    let unset = problem_for(&problems, "agent.task_env.AWS_SECRET_ACCESS_KEY");
    assert!(
        unset.message.contains("UNSET_VARIABLE is not set"),
        "{unset}"
    );
    assert!(
        unset
            .message
            .contains("the tasks get as AWS_SECRET_ACCESS_KEY"),
        "{unset}"
    );
}

#[test]
fn agent_text_and_git_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("big.sh"), "x".repeat(64 * 1024 + 1)).unwrap();
    let cases = [
        (
            "init_script = \"  \"",
            "agent.init_script",
            "the text is empty",
        ),
        (
            "init_script_file = \"big.sh\"",
            "agent.init_script",
            "must be at most 65536 bytes",
        ),
        (
            "git_password_env = \"FLEET_GIT_TOKEN\"",
            "agent.git_user",
            "needs a user name",
        ),
        (
            "git_user = \"ci-bot\"\ngit_password_env = \"FLEET_GIT_TOKEN\"\ngit_password_file = \"token\"",
            "agent.git_password_file",
            "not both",
        ),
    ];

    for (agent, key, needle) in cases {
        let text = format!("{VALID}\n[agent]\n{agent}\n");
        let problems = match parse(&text, "test.toml", dir.path(), &env()) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("{agent}: expected invalid settings, got {other:?}"),
        };

        let problem = problem_for(&problems, key);
        assert!(problem.message.contains(needle), "{agent}: {problem}");
    }
}

#[test]
fn resource_docker_image_is_checked() {
    let text = VALID.replace(
        "hourly_price_usd = { \"g5.xlarge\" = 1.01 }",
        "hourly_price_usd = { \"g5.xlarge\" = 1.01 }\ndocker_image = \"bad'image\"",
    );

    let problems = problems(&text);

    let problem = problem_for(&problems, "resources.gpu-on-demand.docker_image");
    assert_eq!(problem.value, "\"bad'image\"");
    assert!(
        problem.message.contains("docker image reference"),
        "{problem}"
    );
}
