//! Writes the converted configuration as TOML, with the notes as comments at the top.

use std::fmt::Write as _;

use super::input::{AgentExtras, Autoscaler, GIT_PASSWORD_ENV, InstanceProfile, Resource};
use super::{ImportOptions, Note, NoteKind};

/// `clearml.api_server` when the input names no server. The `.invalid` top-level domain never resolves
/// (RFC 2606), so a coordinator started with it fails instead of reaching someone else's server.
const PLACEHOLDER_API_SERVER: &str = "https://clearml-api-server.invalid";
/// Width of the comment lines.
const COMMENT_WIDTH: usize = 110;
/// The range of `budget.max_instances` that `check-config` accepts.
const BUDGET_MAX_INSTANCES: u64 = 100_000;

pub(super) fn render(autoscaler: &Autoscaler, options: &ImportOptions, notes: &[Note]) -> String {
    let mut out = String::new();
    write_header(&mut out, autoscaler, options, notes);
    write_cluster(&mut out, autoscaler, options);
    write_agent(&mut out, &autoscaler.agent);
    for resource in &autoscaler.resources {
        write_resource(&mut out, resource);
    }
    write_queues(&mut out, autoscaler);
    out
}

fn write_header(
    out: &mut String,
    autoscaler: &Autoscaler,
    options: &ImportOptions,
    notes: &[Note],
) {
    comment(
        out,
        "",
        &format!(
            "clearml-fleet configuration converted by `fleet-coordinator import-clearml-config` from the ClearML \
             AWS autoscaler configuration {:?}. docs/import.md describes the migration.",
            options.source_name
        ),
    );
    out.push_str("#\n");
    comment(
        out,
        "",
        "Secrets are never stored here. Set CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY (the ClearML API \
         credentials), then check the file with `fleet-coordinator check-config FILE`.",
    );
    if autoscaler.had_aws_keys {
        comment(
            out,
            "",
            "The input had AWS keys: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for \
             temporary keys) where the coordinator runs, or give its machine an IAM role.",
        );
    }
    if autoscaler.agent.git_user.is_some() {
        comment(
            out,
            "",
            &format!(
                "The input had a Git password or token: set {GIT_PASSWORD_ENV} to it where the coordinator runs."
            ),
        );
    }
    out.push_str("#\n");
    comment(
        out,
        "",
        "Before `fleet-coordinator run --standalone --config FILE`:",
    );
    comment(
        out,
        "  - ",
        "replace every value marked TODO below (prices, and placeholders the input could not fill);",
    );
    comment(
        out,
        "  - ",
        "make the instances start fleet-node-agent: an AMI with fleet-node-agent and clearml-agent, a \
         user_data_template_file per resource that passes the bootstrap token, and api.agent_endpoints \
         (docs/node-agent.md). The ClearML autoscaler installed clearml-agent from its own user data, which is \
         not converted.",
    );

    for (kind, title) in [
        (NoteKind::NotCarriedOver, "Not carried over:"),
        (NoteKind::Warning, "Converted with changes, check these:"),
    ] {
        let selected: Vec<&Note> = notes.iter().filter(|note| note.kind == kind).collect();
        if selected.is_empty() {
            continue;
        }
        out.push_str("#\n");
        comment(out, "", title);
        for note in selected {
            comment(out, "  - ", &format!("{}: {}", note.key, note.message));
        }
    }
    out.push('\n');
}

fn write_cluster(out: &mut String, autoscaler: &Autoscaler, options: &ImportOptions) {
    out.push_str("[cluster]\n");
    let _ = writeln!(out, "name = {}", quote(&options.cluster));
    out.push('\n');
    comment(
        out,
        "",
        "No [etcd] table: run one replica with `fleet-coordinator run --standalone`, like the one ClearML \
         autoscaler process. For failover, add [etcd] and api.bootstrap_key_env (docs/coordinator.md).",
    );
    out.push('\n');

    out.push_str("[clearml]\n");
    let servers = &autoscaler.servers;
    match &servers.api {
        Some(url) => {
            let _ = writeln!(out, "api_server = {}", quote(url));
        }
        None => {
            comment(
                out,
                "",
                "TODO: set the URL of your ClearML API server (api.api_server in the clearml.conf the ClearML \
                 autoscaler ran with). The input does not name it.",
            );
            let _ = writeln!(out, "api_server = {}", quote(PLACEHOLDER_API_SERVER));
        }
    }
    if let Some(url) = &servers.web {
        let _ = writeln!(out, "web_server = {}", quote(url));
    }
    if let Some(url) = &servers.files {
        let _ = writeln!(out, "files_server = {}", quote(url));
    }
    comment(
        out,
        "",
        "From polling_interval_time_min. The default is 2 seconds; a shorter interval launches instances sooner \
         after tasks wait, at one queues and one workers request per interval.",
    );
    let _ = writeln!(
        out,
        "poll_interval_seconds = {}",
        autoscaler.poll_interval_seconds
    );
    out.push('\n');

    out.push_str("[defaults]\n");
    out.push_str("# From max_idle_time_min.\n");
    let _ = writeln!(out, "max_idle_seconds = {}", autoscaler.max_idle_seconds);
    comment(
        out,
        "",
        "From max_spin_up_time_min: the time from the cloud's instance id to the node agent's registration.",
    );
    let _ = writeln!(
        out,
        "boot_timeout_seconds = {}",
        autoscaler.boot_timeout_seconds
    );
    out.push('\n');

    let total: u64 = autoscaler
        .queues
        .iter()
        .map(|queue| queue_max(&queue.resources))
        .sum();
    out.push_str("[budget]\n");
    comment(
        out,
        "",
        "The ClearML autoscaler has no cluster-wide cap; this is the sum of the queues' max_instances. Add \
         hourly_usd for a cost cap once the prices below are real.",
    );
    let _ = writeln!(
        out,
        "max_instances = {}",
        total.clamp(1, BUDGET_MAX_INSTANCES)
    );
    out.push('\n');

    out.push_str("[aws]\n");
    let _ = writeln!(out, "region = {}", quote(&autoscaler.region));
    comment(
        out,
        "",
        "Credentials come from the AWS SDK's default chain: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a \
         profile, or the machine's IAM role.",
    );
    out.push('\n');
}

fn write_agent(out: &mut String, agent: &AgentExtras) {
    if agent.docker_image.is_none()
        && agent.init_script.is_none()
        && agent.extra_clearml_conf.is_none()
        && agent.git_user.is_none()
    {
        return;
    }
    out.push_str("[agent]\n");
    if let Some(image) = &agent.docker_image {
        out.push_str("# From default_docker_image.\n");
        let _ = writeln!(out, "docker_image = {}", quote(image));
    }
    if let Some(script) = &agent.init_script {
        comment(
            out,
            "",
            "From extra_vm_bash_script. The node agent runs it with sh as its own user before clearml-agent \
             starts.",
        );
        let _ = writeln!(out, "init_script = {}", multiline(script));
    }
    if let Some(text) = &agent.extra_clearml_conf {
        comment(
            out,
            "",
            "From extra_clearml_conf. The node agent writes it before its own settings, so the gate's address, \
             the credentials and the worker id are the node agent's.",
        );
        let _ = writeln!(out, "extra_clearml_conf = {}", multiline(text));
    }
    if let Some(user) = &agent.git_user {
        out.push_str(
            "# From git_user. The token is never copied: export it in the variable below.\n",
        );
        let _ = writeln!(out, "git_user = {}", quote(user));
        let _ = writeln!(out, "git_password_env = {}", quote(GIT_PASSWORD_ENV));
    }
    out.push('\n');
}

fn write_resource(out: &mut String, resource: &Resource) {
    let _ = writeln!(out, "[resources.{}]", resource.name);
    out.push_str("provider = \"aws\"\n");
    match resource.max_instances {
        Some(max) => {
            comment(
                out,
                "",
                &format!(
                    "The cap of {:?} in its queue's list in the ClearML configuration.",
                    resource.source_name
                ),
            );
            let _ = writeln!(out, "max_instances = {max}");
        }
        None => {
            comment(
                out,
                "",
                "No queue lists this resource in the ClearML configuration; 1 is the smallest valid cap.",
            );
            out.push_str("max_instances = 1\n");
        }
    }

    let _ = writeln!(out, "image_id = {}", quote(&resource.image_id));
    let _ = writeln!(out, "instance_types = [{}]", quote(&resource.instance_type));
    if resource.subnet.placeholder {
        comment(
            out,
            "",
            &format!(
                "TODO: replace the placeholder with the id of the default subnet of {} (`aws ec2 describe-subnets \
                 --filters Name=availability-zone,Values={} Name=default-for-az,Values=true`).",
                resource.subnet.zone, resource.subnet.zone
            ),
        );
    }
    let _ = writeln!(
        out,
        "subnets = [{{ id = {}, zone = {} }}]",
        quote(&resource.subnet.id),
        quote(&resource.subnet.zone)
    );

    let market = if resource.spot { "spot" } else { "on-demand" };
    let _ = writeln!(out, "market = \"{market}\"");
    if !resource.security_group_ids.is_empty() {
        let _ = writeln!(
            out,
            "security_group_ids = [{}]",
            list(&resource.security_group_ids)
        );
    }
    if let Some(key_name) = &resource.key_name {
        let _ = writeln!(out, "key_name = {}", quote(key_name));
    }
    match &resource.instance_profile {
        Some(InstanceProfile::Name(name)) => {
            let _ = writeln!(out, "instance_profile_name = {}", quote(name));
        }
        Some(InstanceProfile::Arn(arn)) => {
            let _ = writeln!(out, "instance_profile_arn = {}", quote(arn));
        }
        None => {}
    }

    if let Some(volume) = &resource.volume {
        let snapshot = volume
            .snapshot_id
            .as_ref()
            .map(|id| format!(", snapshot_id = {}", quote(id)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "volumes = [{{ device_name = {}, size_gib = {}, volume_type = {}{snapshot} }}]",
            quote(&volume.device_name),
            volume.size_gib,
            quote(&volume.volume_type),
        );
    }
    if !resource.tags.is_empty() {
        let tags: Vec<String> = resource
            .tags
            .iter()
            .map(|(key, value)| format!("{} = {}", quote(key), quote(value)))
            .collect();
        let _ = writeln!(out, "tags = {{ {} }}", tags.join(", "));
    }
    comment(
        out,
        "",
        "TODO: the ClearML configuration has no prices. Replace 0.0 with the instance type's hourly price in \
         USD for this market; the cost metrics and budget.hourly_usd use it.",
    );
    let _ = writeln!(
        out,
        "hourly_price_usd = {{ {} = 0.0 }}",
        quote(&resource.instance_type)
    );
    out.push('\n');
}

fn write_queues(out: &mut String, autoscaler: &Autoscaler) {
    for queue in &autoscaler.queues {
        out.push_str("[[queues]]\n");
        let _ = writeln!(out, "name = {}", quote(&queue.name));
        let names: Vec<String> = queue
            .resources
            .iter()
            .map(|(name, _)| name.clone())
            .collect();
        let _ = writeln!(out, "resources = [{}]", list(&names));
        // auto_scaler.py (supervisor) checks each resource against its own cap only, so the queue could run
        // every resource at its cap at once: the sum. The max would lower that capacity.
        let caps: Vec<String> = queue
            .resources
            .iter()
            .map(|(_, max)| max.to_string())
            .collect();
        comment(
            out,
            "",
            &format!(
                "The sum of the resources' caps ({}): the ClearML autoscaler capped each resource on its own, so \
                 all of them could run at their caps at once. Each cap stays as the resource's max_instances, \
                 and launches go to the first resource in the list with room, as before.",
                caps.join(" + ")
            ),
        );
        let _ = writeln!(
            out,
            "max_instances = {}",
            queue_max(&queue.resources).min(u64::from(u32::MAX))
        );
        out.push('\n');
    }
}

fn queue_max(resources: &[(String, u32)]) -> u64 {
    resources.iter().map(|(_, max)| u64::from(*max)).sum()
}

fn list(items: &[String]) -> String {
    items
        .iter()
        .map(|item| quote(item))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes `text` as a TOML multi-line literal string when it can be one, else as a basic string.
fn multiline(text: &str) -> String {
    let literal = !text.contains("'''")
        && !text.ends_with('\'')
        && text
            .chars()
            .all(|c| c == '\n' || c == '\t' || !c.is_control());
    if literal {
        format!("'''\n{text}'''")
    } else {
        quote(text)
    }
}

/// Quotes `text` as a TOML basic string.
fn quote(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\t' => quoted.push_str("\\t"),
            '\r' => quoted.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(quoted, "\\u{:04X}", c as u32);
            }
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// Writes `text` as comment lines of at most about `COMMENT_WIDTH` characters; `first` starts the first line
/// and continuation lines are indented to match it.
fn comment(out: &mut String, first: &str, text: &str) {
    let indent = " ".repeat(first.len());
    let mut line = format!("# {first}");
    let mut empty = true;
    for word in text.split_whitespace() {
        if !empty && line.len() + 1 + word.len() > COMMENT_WIDTH {
            out.push_str(&line);
            out.push('\n');
            line = format!("# {indent}");
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(word);
        empty = false;
    }
    out.push_str(&line);
    out.push('\n');
}
