//! The AWS provider against moto's EC2 server: launch, idempotency, describe, terminate, spot.

use std::collections::BTreeMap;

use aws_sdk_ec2::types::{Filter, HttpTokensState, InstanceAttributeName};
use base64::Engine;
use fleet_coordinator::providers::aws::EbsVolume;
use fleet_coordinator::providers::{
    CloudProvider, InstanceState, LaunchRequest, Market, TAG_CLUSTER, TAG_INTENT, TAG_QUEUE,
    TAG_RESOURCE, TagFilter,
};
use fleet_tests::ec2::{CLUSTER, Ec2TestBed, FaultRule};

fn request(queue: &str, intent_id: &str) -> LaunchRequest {
    LaunchRequest {
        queue: queue.to_owned(),
        resource: "cpu".to_owned(),
        intent_id: intent_id.to_owned(),
        tags: BTreeMap::from([("team".to_owned(), "vision".to_owned())]),
        boot_values: BTreeMap::new(),
    }
}

fn sorted_ids(instances: &[fleet_coordinator::providers::Instance]) -> Vec<String> {
    let mut ids: Vec<String> = instances
        .iter()
        .map(|instance| instance.id.clone())
        .collect();
    ids.sort();
    ids
}

async fn describe_direct(bed: &Ec2TestBed, ids: &[String]) -> Vec<aws_sdk_ec2::types::Instance> {
    let output = bed
        .direct
        .describe_instances()
        .set_instance_ids(Some(ids.to_vec()))
        .send()
        .await
        .expect("DescribeInstances on moto succeeds");
    output
        .reservations()
        .iter()
        .flat_map(|reservation| reservation.instances().to_vec())
        .collect()
}

fn tag_value<'a>(instance: &'a aws_sdk_ec2::types::Instance, key: &str) -> Option<&'a str> {
    instance
        .tags()
        .iter()
        .find(|tag| tag.key() == Some(key))
        .and_then(|tag| tag.value())
}

#[tokio::test]
async fn launch_sets_tags_user_data_and_launch_options() {
    let bed = Ec2TestBed::start("launch_tags", 2).await.unwrap();
    bed.direct
        .create_key_pair()
        .key_name("fleet-test")
        .send()
        .await
        .unwrap();
    let mut resource = bed.resource(&["m5.large"]);
    resource.user_data_template =
        Some("#!/bin/sh\necho {{queue}} {{intent_id}} {{greeting}}\n".to_owned());
    resource.user_data_vars = BTreeMap::from([("greeting".to_owned(), "hello".to_owned())]);
    resource.tags = BTreeMap::from([("Name".to_owned(), "fleet-test".to_owned())]);
    resource.key_name = Some("fleet-test".to_owned());
    resource.volumes = vec![EbsVolume {
        device_name: "/dev/sdb".to_owned(),
        size_gib: 20,
        volume_type: "gp3".to_owned(),
        snapshot_id: None,
        encrypted: false,
    }];
    let provider = bed
        .provider(bed.config(BTreeMap::from([("cpu".to_owned(), resource)])))
        .await
        .unwrap();

    let outcome = provider
        .launch(&request("gpu", "intent-tags"), 2, "intent-tags")
        .await
        .unwrap();

    assert_eq!(outcome.instances.len(), 2);
    assert!(!outcome.already_launched);
    let ids = sorted_ids(&outcome.instances);
    let instances = describe_direct(&bed, &ids).await;
    assert_eq!(instances.len(), 2);
    for instance in &instances {
        assert_eq!(tag_value(instance, TAG_CLUSTER), Some(CLUSTER));
        assert_eq!(tag_value(instance, TAG_QUEUE), Some("gpu"));
        assert_eq!(tag_value(instance, TAG_RESOURCE), Some("cpu"));
        assert_eq!(tag_value(instance, TAG_INTENT), Some("intent-tags"));
        assert_eq!(tag_value(instance, "team"), Some("vision"));
        assert_eq!(tag_value(instance, "Name"), Some("fleet-test"));
        assert_eq!(instance.key_name(), Some("fleet-test"));
        assert_eq!(instance.image_id(), Some(fleet_tests::ec2::IMAGE_ID));
        assert_eq!(
            instance
                .metadata_options()
                .and_then(|options| options.http_tokens()),
            Some(&HttpTokensState::Required)
        );
    }

    let sent = &bed.proxy.requests("RunInstances")[0];
    let param = |name: &str| sent.get(name).map(String::as_str);
    assert_eq!(param("ClientToken"), Some("intent-tags"));
    assert_eq!(
        param("InstanceInitiatedShutdownBehavior"),
        Some("terminate")
    );
    assert_eq!(param("MetadataOptions.HttpTokens"), Some("required"));
    assert_eq!(param("MetadataOptions.HttpPutResponseHopLimit"), Some("2"));
    assert_eq!(param("BlockDeviceMapping.1.Ebs.VolumeSize"), Some("20"));
    assert_eq!(param("BlockDeviceMapping.1.Ebs.VolumeType"), Some("gp3"));
    assert_eq!(param("TagSpecification.2.ResourceType"), Some("volume"));

    let user_data = bed
        .direct
        .describe_instance_attribute()
        .instance_id(&ids[0])
        .attribute(InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let encoded = user_data
        .user_data()
        .and_then(|value| value.value())
        .expect("user data is set");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    assert_eq!(
        String::from_utf8(decoded).unwrap(),
        "#!/bin/sh\necho gpu intent-tags hello\n"
    );

    let shutdown = bed
        .direct
        .describe_instance_attribute()
        .instance_id(&ids[0])
        .attribute(InstanceAttributeName::InstanceInitiatedShutdownBehavior)
        .send()
        .await
        .unwrap();
    assert_eq!(
        shutdown
            .instance_initiated_shutdown_behavior()
            .and_then(|value| value.value()),
        Some("terminate")
    );

    let volumes = bed
        .direct
        .describe_volumes()
        .filters(
            Filter::builder()
                .name(format!("tag:{TAG_INTENT}"))
                .values("intent-tags")
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(
        !volumes.volumes().is_empty(),
        "the volumes of the launched instances carry the intent tag"
    );
}

#[tokio::test]
async fn same_client_token_returns_same_instances() {
    let bed = Ec2TestBed::start("same_token", 1).await.unwrap();
    let resource = bed.resource(&["m5.large"]);
    let provider = bed
        .provider(bed.config(BTreeMap::from([("cpu".to_owned(), resource)])))
        .await
        .unwrap();

    let first = provider
        .launch(&request("gpu", "intent-1"), 2, "intent-1")
        .await
        .unwrap();
    let second = provider
        .launch(&request("gpu", "intent-1"), 2, "intent-1")
        .await
        .unwrap();

    assert_eq!(sorted_ids(&first.instances), sorted_ids(&second.instances));
    assert!(second.already_launched);
    let all = provider
        .describe(&TagFilter::cluster(CLUSTER))
        .await
        .unwrap();
    assert_eq!(all.len(), 2, "no duplicate instances: {all:?}");
    assert_eq!(bed.proxy.calls("RunInstances"), 1);
}

#[tokio::test]
async fn replay_without_tag_match_relies_on_client_token() {
    let bed = Ec2TestBed::start("token_replay", 1).await.unwrap();
    let resource = bed.resource(&["m5.large"]);
    let provider = bed
        .provider(bed.config(BTreeMap::from([("cpu".to_owned(), resource)])))
        .await
        .unwrap();
    let first = provider
        .launch(&request("gpu", "intent-2"), 2, "intent-2")
        .await
        .unwrap();

    // EC2's describe results can lag a launch: the intent lookup of the replay finds nothing.
    let empty = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<DescribeInstancesResponse \
                 xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>lag</requestId><reservationSet/>\
                 </DescribeInstancesResponse>";
    bed.proxy
        .inject(FaultRule::respond("DescribeInstances", 200, empty).times(1));
    let replay = provider
        .launch(&request("gpu", "intent-2"), 2, "intent-2")
        .await
        .unwrap();

    assert_eq!(sorted_ids(&first.instances), sorted_ids(&replay.instances));
    assert_eq!(bed.proxy.calls("RunInstances"), 2);
    let all = provider
        .describe(&TagFilter::cluster(CLUSTER))
        .await
        .unwrap();
    assert_eq!(all.len(), 2, "no duplicate instances: {all:?}");
}

#[tokio::test]
async fn proxy_rejects_token_reuse_with_other_parameters() {
    let bed = Ec2TestBed::start("token_mismatch", 1).await.unwrap();
    let client = fleet_tests::ec2::sdk_client(&bed.proxy.endpoint());
    let run = |instance_type: &str| {
        client
            .run_instances()
            .image_id(fleet_tests::ec2::IMAGE_ID)
            .instance_type(instance_type.into())
            .subnet_id(&bed.subnets[0].id)
            .min_count(1)
            .max_count(1)
            .client_token("token-a")
            .send()
    };

    let first = run("m5.large").await.unwrap();
    let repeated = run("m5.large").await.unwrap();
    let mismatch = run("m5.xlarge").await.unwrap_err();

    let id = |output: &aws_sdk_ec2::operation::run_instances::RunInstancesOutput| {
        output.instances()[0].instance_id().unwrap().to_owned()
    };
    assert_eq!(id(&first), id(&repeated));
    assert_eq!(first.reservation_id(), repeated.reservation_id());
    let code = aws_sdk_ec2::error::ProvideErrorMetadata::code(&mismatch);
    assert_eq!(code, Some("IdempotentParameterMismatch"));
    let moto_instances = describe_direct(&bed, &[]).await;
    assert_eq!(moto_instances.len(), 1);
}

#[tokio::test]
async fn describe_selects_instances_by_tag() {
    let bed = Ec2TestBed::start("describe_tags", 2).await.unwrap();
    let resources = BTreeMap::from([("cpu".to_owned(), bed.resource(&["m5.large"]))]);
    let provider = bed.provider(bed.config(resources.clone())).await.unwrap();
    let mut other_config = bed.config(resources);
    other_config.cluster = "other-cluster".to_owned();
    let other = bed.provider(other_config).await.unwrap();

    provider
        .launch(&request("gpu", "intent-gpu"), 1, "intent-gpu")
        .await
        .unwrap();
    provider
        .launch(&request("cpu", "intent-cpu"), 2, "intent-cpu")
        .await
        .unwrap();
    other
        .launch(&request("gpu", "intent-other"), 1, "intent-other")
        .await
        .unwrap();
    bed.proxy.reset_calls();

    let cluster = provider
        .describe(&TagFilter::cluster(CLUSTER))
        .await
        .unwrap();
    let gpu = provider
        .describe(&TagFilter::cluster(CLUSTER).with(TAG_QUEUE, "gpu"))
        .await
        .unwrap();

    assert_eq!(cluster.len(), 3);
    assert_eq!(gpu.len(), 1);
    let instance = &gpu[0];
    assert_eq!(instance.tag(TAG_INTENT), Some("intent-gpu"));
    assert!(matches!(
        instance.state,
        InstanceState::Pending | InstanceState::Running
    ));
    assert!(instance.launch_time.is_some());
    assert_eq!(instance.market, Market::OnDemand);
    assert_eq!(instance.zone.as_deref(), Some(bed.subnets[0].zone.as_str()));
    assert_eq!(instance.instance_type.as_deref(), Some("m5.large"));
    assert_eq!(
        bed.proxy.calls("DescribeInstances"),
        2,
        "one page per describe"
    );
}

#[tokio::test]
async fn terminate_ends_instances_and_reports_unknown_ids() {
    let bed = Ec2TestBed::start("terminate", 1).await.unwrap();
    let mut config = bed.config(BTreeMap::from([(
        "cpu".to_owned(),
        bed.resource(&["m5.large"]),
    )]));
    config.terminate_batch_size = 2;
    let provider = bed.provider(config).await.unwrap();
    let launched = provider
        .launch(&request("gpu", "intent-t"), 3, "intent-t")
        .await
        .unwrap();
    let ids = sorted_ids(&launched.instances);
    bed.proxy.reset_calls();

    let mut to_terminate = ids.clone();
    to_terminate.push("i-0123456789abcdef0".to_owned());
    let outcome = provider.terminate(&to_terminate).await.unwrap();

    let mut terminating = outcome.terminating.clone();
    terminating.sort();
    assert_eq!(terminating, ids);
    assert_eq!(outcome.not_found, ["i-0123456789abcdef0"]);
    let described = provider
        .describe(&TagFilter::cluster(CLUSTER))
        .await
        .unwrap();
    assert_eq!(described.len(), 3);
    for instance in described {
        assert!(
            instance.state.is_terminal(),
            "{} is {:?}",
            instance.id,
            instance.state
        );
    }
    // Batches of 2: [a, b] and [c, unknown], the second sent again without the unknown id.
    assert_eq!(bed.proxy.calls("TerminateInstances"), 3);
}

#[tokio::test]
async fn spot_launch_uses_spot_market() {
    let bed = Ec2TestBed::start("spot", 1).await.unwrap();
    let mut resource = bed.resource(&["m5.large"]);
    resource.market = Market::Spot;
    resource.spot_max_price = Some("0.10".to_owned());
    let provider = bed
        .provider(bed.config(BTreeMap::from([("cpu".to_owned(), resource)])))
        .await
        .unwrap();
    let outcome = provider
        .launch(&request("gpu", "intent-spot"), 1, "intent-spot")
        .await
        .unwrap();

    assert_eq!(outcome.instances.len(), 1);
    assert_eq!(outcome.instances[0].market, Market::Spot);
    let described = provider
        .describe(&TagFilter::cluster(CLUSTER))
        .await
        .unwrap();
    assert_eq!(described[0].market, Market::Spot);
    let sent = &bed.proxy.requests("RunInstances")[0];
    let param = |name: &str| sent.get(name).map(String::as_str);
    assert_eq!(param("InstanceMarketOptions.MarketType"), Some("spot"));
    assert_eq!(
        param("InstanceMarketOptions.SpotOptions.SpotInstanceType"),
        Some("one-time")
    );
    assert_eq!(
        param("InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"),
        Some("terminate")
    );
    assert_eq!(
        param("InstanceMarketOptions.SpotOptions.MaxPrice"),
        Some("0.10")
    );
}

#[tokio::test]
async fn describe_follows_pages() {
    let bed = Ec2TestBed::start("describe_pages", 1).await.unwrap();
    let mut config = bed.config(BTreeMap::from([(
        "cpu".to_owned(),
        bed.resource(&["m5.large"]),
    )]));
    config.describe_page_size = 5;
    let provider = bed.provider(config).await.unwrap();
    // One launch per instance gives one reservation per instance; moto 5.2.5 pages by reservation.
    for index in 0..12 {
        let intent = format!("intent-page-{index}");
        provider
            .launch(&request("gpu", &intent), 1, &intent)
            .await
            .unwrap();
    }
    bed.proxy.reset_calls();

    let described = provider
        .describe(&TagFilter::cluster(CLUSTER))
        .await
        .unwrap();

    assert_eq!(described.len(), 12);
    assert_eq!(bed.proxy.calls("DescribeInstances"), 3);
    let pages = bed.proxy.requests("DescribeInstances");
    assert_eq!(pages[0].get("NextToken"), None);
    assert!(pages[1].contains_key("NextToken"));
    assert!(
        pages
            .iter()
            .all(|page| page.get("MaxResults").map(String::as_str) == Some("5"))
    );
}
