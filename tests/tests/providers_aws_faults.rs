//! The AWS provider through the fault proxy: capacity fallback and backoff, throttling, server errors and
//! configuration errors, with the EC2 calls counted.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use fleet_coordinator::providers::{
    Clock, CloudProvider, LaunchRequest, Market, Offering, ProviderError, ProviderEvent,
    SystemClock,
};
use fleet_tests::ec2::{Ec2TestBed, FaultRule, IMAGE_ID};

const MINUTE: Duration = Duration::from_secs(60);

fn request(intent_id: &str) -> LaunchRequest {
    LaunchRequest {
        queue: "gpu".to_owned(),
        resource: "cpu".to_owned(),
        intent_id: intent_id.to_owned(),
        tags: BTreeMap::new(),
        boot_values: BTreeMap::new(),
    }
}

fn offering(instance_type: &str, zone: &str) -> Offering {
    Offering {
        instance_type: instance_type.to_owned(),
        zone: zone.to_owned(),
        market: Market::OnDemand,
    }
}

fn drain_events(
    receiver: &mut tokio::sync::broadcast::Receiver<ProviderEvent>,
) -> Vec<ProviderEvent> {
    let mut events = Vec::new();
    while let Ok(event) = receiver.try_recv() {
        events.push(event);
    }
    events
}

#[tokio::test]
async fn capacity_error_moves_launch_to_next_subnet() {
    let bed = Ec2TestBed::start("capacity_subnet", 2).await.unwrap();
    let resource = bed.resource(&["m5.large", "m5a.large"]);
    let provider = bed
        .provider(bed.config(BTreeMap::from([("cpu".to_owned(), resource)])))
        .await
        .unwrap();
    let mut events = provider.subscribe();
    bed.proxy.inject(
        FaultRule::error("RunInstances", "InsufficientInstanceCapacity")
            .when("InstanceType", "m5.large")
            .when("SubnetId", &bed.subnets[0].id)
            .message("We currently do not have sufficient m5.large capacity in the Availability Zone you requested."),
    );
    let now = SystemClock.now();

    let outcome = provider
        .launch(&request("intent-1"), 1, "intent-1")
        .await
        .unwrap();

    assert_eq!(outcome.instances.len(), 1);
    let instance = &outcome.instances[0];
    assert_eq!(instance.zone.as_deref(), Some("us-east-1b"));
    assert_eq!(instance.instance_type.as_deref(), Some("m5.large"));
    let backed_off = offering("m5.large", "us-east-1a");
    assert_eq!(outcome.capacity_failures.len(), 1);
    assert_eq!(outcome.capacity_failures[0].offering, backed_off);
    assert_eq!(
        outcome.capacity_failures[0].code,
        "InsufficientInstanceCapacity"
    );
    // One call per offering: the SDK did not retry the HTTP 500 of the capacity error.
    assert_eq!(bed.proxy.calls("RunInstances"), 2);

    let backoffs = provider.backoffs();
    let backoff = backoffs
        .active(&backed_off.key(), now)
        .expect("the failed offering is in backoff");
    assert_eq!(backoff.failures, 1);
    assert!(backoff.until >= now + 3 * MINUTE, "{backoff:?}");
    assert!(backoff.until <= now + 3 * MINUTE + MINUTE, "{backoff:?}");
    assert!(
        backoffs
            .active(&offering("m5.large", "us-east-1b").key(), now)
            .is_none()
    );

    let events = drain_events(&mut events);
    assert!(
        matches!(&events[..], [ProviderEvent::OfferingBackedOff { offering, code, failures: 1, .. }]
            if *offering == backed_off && code == "InsufficientInstanceCapacity"),
        "{events:?}"
    );

    // The next launch skips the offering in backoff without calling EC2 for it.
    let next = provider
        .launch(&request("intent-2"), 1, "intent-2")
        .await
        .unwrap();
    assert_eq!(next.skipped_in_backoff, [backed_off]);
    assert_eq!(next.instances[0].zone.as_deref(), Some("us-east-1b"));
    assert_eq!(bed.proxy.calls("RunInstances"), 3);
}

#[tokio::test]
async fn capacity_error_moves_launch_to_next_type() {
    let bed = Ec2TestBed::start("capacity_type", 2).await.unwrap();
    let resource = bed.resource(&["m5.large", "m5a.large"]);
    let provider = bed
        .provider(bed.config(BTreeMap::from([("cpu".to_owned(), resource)])))
        .await
        .unwrap();
    bed.proxy.inject(
        FaultRule::error("RunInstances", "InsufficientInstanceCapacity")
            .when("InstanceType", "m5.large"),
    );

    let outcome = provider
        .launch(&request("intent-1"), 2, "intent-1")
        .await
        .unwrap();

    assert_eq!(outcome.instances.len(), 2);
    for instance in &outcome.instances {
        assert_eq!(instance.instance_type.as_deref(), Some("m5a.large"));
        assert_eq!(instance.zone.as_deref(), Some("us-east-1a"));
    }
    let failed: Vec<Offering> = outcome
        .capacity_failures
        .iter()
        .map(|failure| failure.offering.clone())
        .collect();
    assert_eq!(
        failed,
        [
            offering("m5.large", "us-east-1a"),
            offering("m5.large", "us-east-1b")
        ]
    );
    assert_eq!(bed.proxy.calls("RunInstances"), 3);
    let tokens: Vec<String> = bed
        .proxy
        .requests("RunInstances")
        .iter()
        .map(|params| params["ClientToken"].clone())
        .collect();
    assert_eq!(tokens, ["intent-1", "intent-1-1", "intent-1-2"]);
}

#[tokio::test]
async fn launch_in_full_backoff_makes_no_call() {
    let bed = Ec2TestBed::start("capacity_all", 1).await.unwrap();
    let resource = bed.resource(&["m5.large"]);
    let provider = bed
        .provider(bed.config(BTreeMap::from([("cpu".to_owned(), resource)])))
        .await
        .unwrap();
    bed.proxy
        .inject(FaultRule::error("RunInstances", "VcpuLimitExceeded"));

    let first = provider
        .launch(&request("intent-1"), 1, "intent-1")
        .await
        .unwrap();
    let second = provider.launch(&request("intent-2"), 1, "intent-2").await;

    assert!(first.instances.is_empty());
    assert_eq!(first.capacity_failures.len(), 1);
    match second {
        Err(ProviderError::NoCapacity {
            resource,
            retry_after,
        }) => {
            assert_eq!(resource, "cpu");
            assert!(
                retry_after <= 3 * MINUTE && retry_after > 2 * MINUTE,
                "{retry_after:?}"
            );
        }
        other => panic!("expected NoCapacity, got {other:?}"),
    }
    assert_eq!(bed.proxy.calls("RunInstances"), 1);
}

#[tokio::test]
async fn throttling_is_retried_and_bounded() {
    let bed = Ec2TestBed::start("throttling", 1).await.unwrap();
    let resource = bed.resource(&["m5.large"]);
    let provider = bed
        .provider(bed.config(BTreeMap::from([("cpu".to_owned(), resource)])))
        .await
        .unwrap();
    bed.proxy
        .inject(FaultRule::error("*", "RequestLimitExceeded").times(3));

    let outcome = provider
        .launch(&request("intent-1"), 1, "intent-1")
        .await
        .unwrap();

    assert_eq!(outcome.instances.len(), 1);
    // The intent lookup (DescribeInstances) received the three throttled responses, then each call went through once.
    assert_eq!(bed.proxy.calls("DescribeInstances"), 4);
    assert_eq!(bed.proxy.calls("RunInstances"), 1);

    bed.proxy.reset_calls();
    bed.proxy
        .inject(FaultRule::error("RunInstances", "RequestLimitExceeded"));
    let throttled = provider.launch(&request("intent-2"), 1, "intent-2").await;

    match throttled {
        Err(ProviderError::Throttled {
            action,
            attempts,
            code,
        }) => {
            assert_eq!(action, "RunInstances");
            assert_eq!(attempts, 6);
            assert_eq!(code, "RequestLimitExceeded");
        }
        other => panic!("expected Throttled, got {other:?}"),
    }
    assert_eq!(
        bed.proxy.calls("RunInstances"),
        6,
        "retries stop at max_attempts"
    );
    assert!(
        provider.backoffs().entries().next().is_none(),
        "throttling backs off no offering"
    );
}

#[tokio::test]
async fn server_errors_and_latency_are_retried() {
    let bed = Ec2TestBed::start("server_errors", 1).await.unwrap();
    let resource = bed.resource(&["m5.large"]);
    let provider = bed
        .provider(bed.config(BTreeMap::from([("cpu".to_owned(), resource)])))
        .await
        .unwrap();
    bed.proxy
        .inject(FaultRule::error("RunInstances", "InternalError").times(2));
    bed.proxy
        .inject(FaultRule::delay("RunInstances", Duration::from_millis(200)).times(1));
    let started = std::time::Instant::now();

    let outcome = provider
        .launch(&request("intent-1"), 1, "intent-1")
        .await
        .unwrap();

    assert_eq!(outcome.instances.len(), 1);
    assert_eq!(bed.proxy.calls("RunInstances"), 3);
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn invalid_ami_disables_resource_until_config_changes() {
    let bed = Ec2TestBed::start("invalid_ami", 2).await.unwrap();
    let resource = bed.resource(&["m5.large", "m5a.large"]);
    let provider = bed
        .provider(bed.config(BTreeMap::from([("cpu".to_owned(), resource.clone())])))
        .await
        .unwrap();
    let mut events = provider.subscribe();
    bed.proxy.inject(
        FaultRule::error("RunInstances", "InvalidAMIID.NotFound")
            .when("ImageId", IMAGE_ID)
            .message(&format!("The image id '[{IMAGE_ID}]' does not exist")),
    );

    let first = provider.launch(&request("intent-1"), 1, "intent-1").await;
    let second = provider.launch(&request("intent-2"), 1, "intent-2").await;

    match first {
        Err(ProviderError::Configuration { action, detail }) => {
            assert_eq!(action, "RunInstances");
            assert_eq!(detail.parameter, "image_id");
            assert_eq!(detail.value, IMAGE_ID);
            assert_eq!(detail.code, "InvalidAMIID.NotFound");
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }
    let second = second.expect_err("a disabled resource does not launch");
    assert!(
        matches!(&second, ProviderError::ResourceDisabled { detail } if detail.parameter == "image_id")
    );
    assert!(second.to_string().contains(IMAGE_ID), "{second}");
    // No retry, no fallback to other offerings, no call at all while disabled.
    assert_eq!(bed.proxy.calls("RunInstances"), 1);
    assert_eq!(bed.proxy.calls("DescribeInstances"), 1);
    let disabled_events = drain_events(&mut events);
    assert!(
        matches!(&disabled_events[..], [ProviderEvent::ResourceDisabled(detail)]
            if detail.parameter == "image_id" && detail.value == IMAGE_ID && detail.resource == "cpu"),
        "{disabled_events:?}"
    );
    assert!(
        provider.backoffs().entries().next().is_none(),
        "a bad AMI backs off no offering"
    );

    // The same configuration keeps the resource disabled; a new AMI enables it.
    provider.update_resource("cpu", resource.clone()).unwrap();
    assert!(provider.disabled_resources().contains_key("cpu"));
    let mut fixed = resource;
    fixed.image_id = "ami-0fedcba987654321".to_owned();
    provider.update_resource("cpu", fixed).unwrap();
    let launched = provider
        .launch(&request("intent-3"), 1, "intent-3")
        .await
        .unwrap();

    assert_eq!(launched.instances.len(), 1);
    assert!(provider.disabled_resources().is_empty());
    let enabled_events = drain_events(&mut events);
    assert!(
        matches!(&enabled_events[..], [ProviderEvent::ResourceEnabled { resource }] if resource == "cpu"),
        "{enabled_events:?}"
    );
}

#[tokio::test]
async fn invalid_subnet_names_the_subnet() {
    let bed = Ec2TestBed::start("invalid_subnet", 2).await.unwrap();
    let resource = bed.resource(&["m5.large"]);
    let provider = bed
        .provider(bed.config(BTreeMap::from([("cpu".to_owned(), resource)])))
        .await
        .unwrap();
    bed.proxy.inject(
        FaultRule::error("RunInstances", "InvalidSubnetID.NotFound")
            .when("SubnetId", &bed.subnets[0].id),
    );

    let error = provider
        .launch(&request("intent-1"), 1, "intent-1")
        .await
        .unwrap_err();

    match error {
        ProviderError::Configuration { detail, .. } => {
            assert_eq!(detail.parameter, "subnets");
            assert_eq!(detail.value, bed.subnets[0].id);
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }
    assert_eq!(bed.proxy.calls("RunInstances"), 1);
}

#[tokio::test]
async fn launch_time_is_reported() {
    let bed = Ec2TestBed::start("launch_time", 1).await.unwrap();
    let provider = bed
        .provider(bed.config(BTreeMap::from([(
            "cpu".to_owned(),
            bed.resource(&["m5.large"]),
        )])))
        .await
        .unwrap();
    let before = SystemTime::now() - MINUTE;

    let outcome = provider
        .launch(&request("intent-1"), 1, "intent-1")
        .await
        .unwrap();

    let launch_time = outcome.instances[0]
        .launch_time
        .expect("EC2 reports a launch time");
    assert!(launch_time >= before, "{launch_time:?}");
}
