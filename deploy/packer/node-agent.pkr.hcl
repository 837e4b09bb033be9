# Packer template of the fleet instances' AMI: Ubuntu 24.04 with clearml-agent, fleet-node-agent and its
# systemd unit, enabled. The unit starts only once the user-data of a fleet launch
# (deploy/cloud-init/node-agent-user-data.sh.tmpl) has written /etc/clearml-fleet/agent.toml.
#
# Build from the repository root, after building the agent for the target (see docs/deploy.md):
#   packer init deploy/packer/node-agent.pkr.hcl
#   packer build -var ca_certificate_file=path/to/ca.pem deploy/packer/node-agent.pkr.hcl
# The resulting AMI id goes into resources.NAME.image_id of the coordinator's configuration.

packer {
  required_version = ">= 1.7.0"
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.2.0"
    }
  }
}

variable "region" {
  type        = string
  description = "AWS region to build the AMI in."
  default     = "us-east-1"
}

variable "instance_type" {
  type        = string
  description = "Instance type of the temporary build instance."
  default     = "t3.medium"
}

variable "subnet_id" {
  type        = string
  description = "Subnet of the build instance; empty uses the default VPC."
  default     = ""
}

variable "ami_name_prefix" {
  type        = string
  description = "Prefix of the AMI name; a UTC timestamp is appended."
  default     = "clearml-fleet-node-agent"
}

variable "clearml_agent_version" {
  type        = string
  description = "clearml-agent version installed from PyPI. The node agent's gate is tested with 3.0.3."
  default     = "3.0.3"
}

variable "node_agent_binary" {
  type        = string
  description = "Path of the fleet-node-agent binary built for x86_64 Linux (glibc)."
  default     = "target/release/fleet-node-agent"
}

variable "ca_certificate_file" {
  type        = string
  description = "PEM file of the CA that signed the coordinators' gRPC certificates. Public, not a secret."
}

variable "ca_certificate_path" {
  type        = string
  description = "Where the image keeps the CA certificate; the user-data template's coordinator.ca_certificate must match."
  default     = "/etc/clearml-fleet/ca.pem"
}

locals {
  timestamp = formatdate("YYYYMMDDhhmmss", timestamp())
}

source "amazon-ebs" "node_agent" {
  region        = var.region
  instance_type = var.instance_type
  subnet_id     = var.subnet_id == "" ? null : var.subnet_id
  ami_name      = "${var.ami_name_prefix}-${local.timestamp}"
  ssh_username  = "ubuntu"

  source_ami_filter {
    filters = {
      name                = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    # Canonical's account.
    owners      = ["099720109477"]
    most_recent = true
  }

  # The AMI asks for IMDSv2 by default; the coordinator also sets HttpTokens=required at launch.
  imds_support = "v2.0"
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 2
  }

  tags = {
    Name                  = "${var.ami_name_prefix}-${local.timestamp}"
    "clearml-agent"       = var.clearml_agent_version
    "clearml-fleet:image" = "node-agent"
  }
}

build {
  sources = ["source.amazon-ebs.node_agent"]

  provisioner "file" {
    source      = var.node_agent_binary
    destination = "/tmp/fleet-node-agent"
  }

  provisioner "file" {
    source      = "${path.root}/../systemd/fleet-node-agent.service"
    destination = "/tmp/fleet-node-agent.service"
  }

  provisioner "file" {
    source      = "${path.root}/../systemd/50-clearml-fleet-agent.rules"
    destination = "/tmp/50-clearml-fleet-agent.rules"
  }

  provisioner "file" {
    source      = "${path.root}/../systemd/clearml-fleet.sysusers.conf"
    destination = "/tmp/clearml-fleet.sysusers.conf"
  }

  provisioner "file" {
    source      = var.ca_certificate_file
    destination = "/tmp/clearml-fleet-ca.pem"
  }

  provisioner "shell" {
    environment_vars = [
      "CLEARML_AGENT_VERSION=${var.clearml_agent_version}",
      "CA_CERTIFICATE_PATH=${var.ca_certificate_path}",
      "DEBIAN_FRONTEND=noninteractive",
    ]
    execute_command = "sudo -E sh -eu '{{ .Path }}'"
    inline = [
      # cloud-init of the build instance may still be installing packages.
      "cloud-init status --wait || true",
      "apt-get update",
      # git: clearml-agent clones the tasks' repositories. polkitd: lets the agent's user power off.
      "apt-get install -y --no-install-recommends python3-venv python3-pip git polkitd",

      "install -m 0644 /tmp/clearml-fleet.sysusers.conf /etc/sysusers.d/clearml-fleet.conf",
      "systemd-sysusers",

      "python3 -m venv /opt/clearml-agent",
      "/opt/clearml-agent/bin/pip install --no-cache-dir \"clearml-agent==$CLEARML_AGENT_VERSION\"",
      "/opt/clearml-agent/bin/clearml-agent --version",

      "install -m 0755 /tmp/fleet-node-agent /usr/local/bin/fleet-node-agent",
      "install -m 0644 /tmp/fleet-node-agent.service /etc/systemd/system/fleet-node-agent.service",
      "install -d -m 0755 /etc/polkit-1/rules.d",
      "install -m 0644 /tmp/50-clearml-fleet-agent.rules /etc/polkit-1/rules.d/50-clearml-fleet-agent.rules",
      "install -d -m 0755 /etc/clearml-fleet \"$(dirname \"$CA_CERTIFICATE_PATH\")\"",
      "install -m 0644 /tmp/clearml-fleet-ca.pem \"$CA_CERTIFICATE_PATH\"",

      # The image must not carry an agent.toml: the unit starts only after the user-data has written one.
      "rm -f /etc/clearml-fleet/agent.toml",
      "systemctl daemon-reload",
      "systemctl enable fleet-node-agent.service",

      "rm -f /tmp/fleet-node-agent /tmp/fleet-node-agent.service /tmp/50-clearml-fleet-agent.rules /tmp/clearml-fleet.sysusers.conf /tmp/clearml-fleet-ca.pem",
      # Instances of the AMI run cloud-init from scratch, including the fleet user-data.
      "cloud-init clean --logs",
    ]
  }
}
