//! Scale benchmark: N AmiCopies × 3 destinations against the test bed's real
//! kube-apiserver and the EC2 simulator, with the operator as a separate
//! process (the binary under test). Prints one table row per (tracking mode,
//! N). Run it with `hack/bench.sh`, which starts the test bed.
//!
//! Per scenario: the simulator keeps copies pending until told otherwise and
//! allows any number in flight (the operator's own limits are raised too), so
//! what is measured is the operator's own throughput and tracking cost:
//! - `issue`: from the first object applied until every CopyImage was
//!   answered by the simulator;
//! - EC2 calls by operation, counted by the simulator, per object;
//!   DescribeImages calls per tracking interval per region while all copies
//!   are pending; and, once all are available (steady state), calls per drift
//!   period (`--resync-interval`, four tracking intervals here);
//! - `ready`: from the simulator turning every copy available until every
//!   object is Ready, in seconds and in tracking intervals;
//! - the operator's peak RSS (VmHWM) and CPU seconds;
//! - while objects turn Ready, the CPU seconds of each process on the
//!   machine's cores: the operator, kube-apiserver and etcd (their pids come
//!   from `hack/bench.sh` in `AMICOPY_BENCH_PEERS`, `name=pid,...`) and this
//!   benchmark's process, which runs the simulator. It says what bounds
//!   `ready`.
//!
//! With `--paced-sizes`, a second kind of scenario measures copy admission
//! against its limits: the operator's default limits, copies that take
//! `--copy-secs` (default 10) in a simulator that refuses a 51st copy per
//! region as EC2 does, and the time until every CopyImage was issued and
//! every object Ready against the ideal of copies started in waves of 25
//! (the per-source-region limit) one copy time apart. It prints a third
//! table, with how many copies were in flight while the operator issued
//! them.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ami_copy_operator::AmiCopy;
use ec2_sim::{Identity, SeedImage, SimConfig, Simulator};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

const REGIONS: [&str; 3] = ["eu-west-1", "ap-southeast-2", "us-west-2"];
const ACCESS_KEY: &str = "AKIDAMICOPYBENCH0001";
const SECRET_KEY: &str = "amicopy-bench-secret";

struct Args {
    sizes: Vec<usize>,
    modes: Vec<String>,
    naive_max: usize,
    interval: Duration,
    operator: String,
    moto_sizes: Vec<usize>,
    paced_sizes: Vec<usize>,
    copy: Duration,
    /// Where to write the figures as JSON.
    json: Option<String>,
    /// Largest N whose objects then move to a new source (the rollout
    /// phase: publication, in-use look-ups, retirement).
    rollout_max: usize,
}

/// A comma-separated list of object counts; empty for none.
fn sizes(list: &str) -> Vec<usize> {
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("a number"))
        .collect()
}

fn args() -> Args {
    let mut a = Args {
        sizes: vec![100, 1000, 10000],
        modes: vec!["batched".into(), "per-object".into()],
        naive_max: 1000,
        interval: Duration::from_secs(5),
        moto_sizes: Vec::new(),
        paced_sizes: Vec::new(),
        copy: Duration::from_secs(10),
        json: None,
        rollout_max: 1000,
        operator: std::env::var("AMICOPY_OPERATOR_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_ami-copy-operator").into()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--sizes" => a.sizes = sizes(&value()),
            "--modes" => a.modes = value().split(',').map(String::from).collect(),
            "--naive-max" => a.naive_max = value().parse().expect("a number"),
            "--moto-sizes" => a.moto_sizes = sizes(&value()),
            "--paced-sizes" => a.paced_sizes = sizes(&value()),
            "--copy-secs" => a.copy = Duration::from_secs(value().parse().expect("a number")),
            "--interval-secs" => {
                a.interval = Duration::from_secs(value().parse().expect("a number"))
            }
            "--json" => a.json = Some(value()),
            "--rollout-max" => a.rollout_max = value().parse().expect("a number"),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

#[derive(Default)]
struct Row {
    mode: String,
    n: usize,
    apply_s: f64,
    issue_s: Option<f64>,
    ready_s: Option<f64>,
    calls: BTreeMap<String, u64>,
    describe_pending_per_interval: f64,
    describe_steady_per_resync: f64,
    steady_calls_per_object: f64,
    rss_mib: f64,
    cpu_s: f64,
    /// CPU seconds per process from the copies turning available until all
    /// objects are Ready.
    ready_cpu: Vec<(String, f64)>,
    /// kube-apiserver requests but watches (verb resource[/sub]) from
    /// the copies turning available until all objects are Ready.
    ready_requests: BTreeMap<String, u64>,
    /// The move of every object to a new source, up to `--rollout-max`.
    rollout: Option<Rollout>,
}

/// Every object moved to a new source: copies, publication of the new IDs,
/// the in-use look-ups of the old copies and their retirement.
#[derive(Default)]
struct Rollout {
    /// From the first patch until every object has published the new
    /// copies and retired the old ones.
    done_s: Option<f64>,
    /// EC2 calls in that phase, by operation.
    calls: BTreeMap<String, u64>,
    /// Reconciles in that phase (the operator's count), for the calls per
    /// round.
    reconciles: u64,
    /// The operator's peak RSS by the end of the phase, and its CPU
    /// seconds in it.
    peak_rss_mib: f64,
    cpu_s: f64,
}

#[tokio::main]
async fn main() {
    let args = args();
    let kube = kube().await;
    if !args.sizes.is_empty() {
        println!(
            "| tracking | N×3 | apply s | all CopyImage issued s | Ready after copies available s (intervals) | EC2 calls per object | DescribeImages / interval / region, all pending | DescribeImages / drift period / region, steady | steady-state EC2 calls per object per drift period | peak RSS MiB | CPU s |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
    }
    let mut rows = Vec::new();
    for &n in &args.sizes {
        for mode in &args.modes {
            if mode == "per-object" && n > args.naive_max {
                println!(
                    "| {mode} | {n} | skipped (above --naive-max {}) |||||||||",
                    args.naive_max
                );
                continue;
            }
            let row = scenario(&kube, &args, mode, n).await;
            print_row(&row, args.interval);
            rows.push(row);
        }
    }
    print_ready_cpu(&rows);
    print_rollouts(&rows);
    if let Some(path) = &args.json {
        write_json(path, &args, &rows);
    }
    if !args.paced_sizes.is_empty() {
        println!();
        println!(
            "| paced | N×3 | copy s | all CopyImage issued s (ideal) | all Ready s (ideal) | copies in flight while issuing: mean / limit | most in flight | ResourceLimitExceeded |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for &n in &args.paced_sizes {
            paced_scenario(&kube, &args, n).await;
        }
    }
    if !args.moto_sizes.is_empty() {
        let endpoint =
            std::env::var("AMICOPY_MOTO_ENDPOINT").expect("AMICOPY_MOTO_ENDPOINT for --moto-sizes");
        println!();
        println!(
            "| peer | N×3 | apply s | apply → all Ready s | Ready | EC2 calls per object (operator's count) | peak RSS MiB | CPU s |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for &n in &args.moto_sizes {
            moto_scenario(&kube, &args, &endpoint, n).await;
        }
    }
}

/// Seconds to one decimal, or "not reached".
fn seconds(v: Option<f64>) -> String {
    v.map_or("not reached".to_string(), |v| format!("{v:.1}"))
}

/// CopyImage calls the simulator has answered with a new image.
fn copies_issued(sim: &Simulator) -> usize {
    sim.calls()
        .iter()
        .filter(|c| c.action == "CopyImage" && c.outcome == "ok")
        .map(|c| c.count as usize)
        .sum()
}

fn print_row(r: &Row, interval: Duration) {
    let total: u64 = r.calls.values().sum();
    let per_op: Vec<String> = r
        .calls
        .iter()
        .map(|(op, c)| format!("{op} {:.2}", *c as f64 / r.n as f64))
        .collect();
    let intervals = r
        .ready_s
        .map_or("-".into(), |s| format!("{:.2}", s / interval.as_secs_f64()));
    println!(
        "| {} | {} | {:.1} | {} | {} ({}) | {:.2} ({}) | {:.2} | {:.2} | {:.4} | {:.1} | {:.1} |",
        r.mode,
        r.n,
        r.apply_s,
        seconds(r.issue_s),
        seconds(r.ready_s),
        intervals,
        total as f64 / r.n as f64,
        per_op.join(", "),
        r.describe_pending_per_interval,
        r.describe_steady_per_resync,
        r.steady_calls_per_object,
        r.rss_mib,
        r.cpu_s,
    );
}

/// Where the CPU went while the objects turned Ready.
fn print_ready_cpu(rows: &[Row]) {
    let Some(first) = rows.first() else { return };
    let names: Vec<&str> = first.ready_cpu.iter().map(|(n, _)| n.as_str()).collect();
    println!();
    println!(
        "| tracking | N×3 | Ready after copies available s | CPU s available (cores × s) | CPU s while turning Ready: {} | sum | kube-apiserver requests per object (watches aside) |",
        names.join(" | ")
    );
    println!("|---|---|---|---|{}---|---|", "---|".repeat(names.len()));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    for r in rows {
        let cells: Vec<String> = r.ready_cpu.iter().map(|(_, s)| format!("{s:.1}")).collect();
        let sum: f64 = r.ready_cpu.iter().map(|(_, s)| s).sum();
        let requests: Vec<String> = r
            .ready_requests
            .iter()
            .map(|(what, c)| format!("{what} {:.2}", *c as f64 / r.n as f64))
            .collect();
        println!(
            "| {} | {} | {} | {} | {} | {sum:.1} | {} |",
            r.mode,
            r.n,
            seconds(r.ready_s),
            r.ready_s
                .map_or("-".into(), |s| format!("{:.1}", s * cores)),
            cells.join(" | "),
            requests.join(", ")
        );
    }
}

/// The rollout phase of each row that had one.
fn print_rollouts(rows: &[Row]) {
    if rows.iter().all(|r| r.rollout.is_none()) {
        return;
    }
    println!();
    println!(
        "| tracking | N×3 | new source → published and old copies retired s | EC2 calls per object (by operation) | in-use look-ups (DescribeLaunchTemplateVersions + DescribeInstances) per region per 100 objects | reconciles per object | peak RSS MiB by its end | CPU s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        let Some(ro) = &r.rollout else { continue };
        let n = r.n as f64;
        let total: u64 = ro.calls.values().sum();
        let per_op: Vec<String> = ro
            .calls
            .iter()
            .map(|(op, c)| format!("{op} {:.2}", *c as f64 / n))
            .collect();
        println!(
            "| {} | {} | {} | {:.2} ({}) | {:.2} | {:.2} | {:.1} | {:.1} |",
            r.mode,
            r.n,
            seconds(ro.done_s),
            total as f64 / n,
            per_op.join(", "),
            in_use_lookups(ro) as f64 / REGIONS.len() as f64 / n * 100.0,
            ro.reconciles as f64 / n,
            ro.peak_rss_mib,
            ro.cpu_s,
        );
    }
}

/// The in-use look-ups of a rollout: launch template versions and
/// instances, every region.
fn in_use_lookups(ro: &Rollout) -> u64 {
    ["DescribeLaunchTemplateVersions", "DescribeInstances"]
        .iter()
        .map(|op| ro.calls.get(*op).copied().unwrap_or(0))
        .sum()
}

/// The figures of every row as JSON, with the date, commit and machine.
fn write_json(path: &str, args: &Args, rows: &[Row]) {
    let per_object = |calls: &BTreeMap<String, u64>, n: usize| -> serde_json::Value {
        calls
            .iter()
            .map(|(op, c)| (op.clone(), json!(*c as f64 / n as f64)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let records: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let total: u64 = r.calls.values().sum();
            let operator_ready_cpu = r
                .ready_cpu
                .iter()
                .find(|(name, _)| name == "operator")
                .map(|(_, s)| *s);
            let ready_cpu: serde_json::Map<String, serde_json::Value> = r
                .ready_cpu
                .iter()
                .map(|(name, s)| (name.clone(), json!(s)))
                .collect();
            json!({
                "tracking": r.mode,
                "n": r.n,
                "destinations": REGIONS.len(),
                "apply_s": r.apply_s,
                "copy_image_issued_s": r.issue_s,
                "peak_rss_mib": r.rss_mib,
                "ec2_calls_per_object": total as f64 / r.n as f64,
                "ec2_calls_per_object_by_operation": per_object(&r.calls, r.n),
                "describe_images_per_interval_per_region": r.describe_pending_per_interval,
                "describe_images_per_drift_period_per_region_steady": r.describe_steady_per_resync,
                "steady_calls_per_object_per_period": r.steady_calls_per_object,
                "ready_after_available_s": r.ready_s,
                "ready_intervals": r.ready_s.map(|s| s / args.interval.as_secs_f64()),
                "operator_cpu_s": r.cpu_s,
                "operator_cpu_s_while_turning_ready": operator_ready_cpu,
                "operator_cpu_ms_per_object": operator_ready_cpu.map(|s| s * 1000.0 / r.n as f64),
                "cpu_s_while_turning_ready_by_process": ready_cpu,
                "apiserver_requests_per_object_while_turning_ready": per_object(&r.ready_requests, r.n),
                "rollout": r.rollout.as_ref().map(|ro| json!({
                    "published_and_retired_s": ro.done_s,
                    "ec2_calls_per_object_by_operation": per_object(&ro.calls, r.n),
                    "in_use_lookups_per_region_per_100_objects":
                        in_use_lookups(ro) as f64 / REGIONS.len() as f64 / r.n as f64 * 100.0,
                    "reconciles_per_object": ro.reconciles as f64 / r.n as f64,
                    "peak_rss_mib": ro.peak_rss_mib,
                    "operator_cpu_s": ro.cpu_s,
                })),
            })
        })
        .collect();
    let env = |k: &str| std::env::var(k).ok();
    let doc = json!({
        "date": env("AMICOPY_BENCH_DATE"),
        "commit": env("AMICOPY_BENCH_COMMIT"),
        "command": env("AMICOPY_BENCH_COMMAND"),
        "machine": {
            "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "memory_gib": env("AMICOPY_BENCH_MEMORY_GIB"),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned()),
        },
        "tracking_interval_s": args.interval.as_secs_f64(),
        "drift_period_s": resync(args).as_secs_f64(),
        "records": records,
    });
    let text = serde_json::to_string_pretty(&doc).expect("JSON") + "\n";
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {path}: {e}"));
}

/// CPU seconds so far of the operator, the test bed's peers and this process.
fn cpu_by_process(operator: u32) -> Vec<(String, f64)> {
    let mut out = vec![("operator".to_string(), usage(operator).1)];
    for peer in std::env::var("AMICOPY_BENCH_PEERS")
        .unwrap_or_default()
        .split(',')
        .filter(|p| !p.is_empty())
    {
        if let Some((name, pid)) = peer.split_once('=')
            && let Ok(pid) = pid.parse()
        {
            out.push((name.to_owned(), usage(pid).1));
        }
    }
    out.push((
        "benchmark + simulator".to_string(),
        usage(std::process::id()).1,
    ));
    out
}

/// kube-apiserver's count of requests but watches, by `verb resource`
/// (`/subresource`), from its own `apiserver_request_total`.
async fn apiserver_requests(kube: &Client) -> BTreeMap<String, u64> {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("a GET request");
    let text = kube.request_text(req).await.unwrap_or_default();
    let label = |line: &str, name: &str| {
        line.split(&format!(",{name}=\""))
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_default()
            .to_owned()
    };
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let verb = label(line, "verb");
        if verb == "WATCH" {
            continue;
        }
        let (resource, sub) = (label(line, "resource"), label(line, "subresource"));
        let what = if sub.is_empty() {
            format!("{verb} {resource}")
        } else {
            format!("{verb} {resource}/{sub}")
        };
        let n: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        *out.entry(what).or_default() += n;
    }
    out
}

async fn kube() -> Client {
    let path =
        std::env::var("AMICOPY_KUBECONFIG").expect("AMICOPY_KUBECONFIG: run through hack/bench.sh");
    let kc = Kubeconfig::read_from(path).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    config.read_timeout = Some(Duration::from_secs(120));
    Client::try_from(config).unwrap()
}

fn sim_config() -> SimConfig {
    let mut config = SimConfig {
        // Pending until the benchmark turns them available.
        copy_duration: Duration::from_secs(24 * 3600),
        concurrent_copy_limit: usize::MAX / 2,
        seed: Some(7),
        ..SimConfig::default()
    };
    config.identities.insert(
        ACCESS_KEY.into(),
        Identity {
            account: "123456789012".into(),
            secret_access_key: Some(SECRET_KEY.into()),
        },
    );
    config
}

/// The operator binary for one scenario. `limits`: the default copy limits
/// (50 per destination region, 25 per source region) instead of limits too
/// high to bind.
fn spawn_operator(
    args: &Args,
    mode: &str,
    ns: &str,
    endpoint: &str,
    metrics_port: u16,
    limits: bool,
) -> Child {
    let kubeconfig = std::env::var("AMICOPY_KUBECONFIG").unwrap();
    let interval = format!("{}s", args.interval.as_secs());
    let resync = format!("{}s", resync(args).as_secs());
    let limit = if limits { None } else { Some("1000000") };
    Command::new(&args.operator)
        .args([
            "run",
            "--namespace",
            ns,
            "--ec2-endpoint-url",
            endpoint,
            "--sts-endpoint-url",
            endpoint,
            "--tracking",
            mode,
        ])
        .args(["--poll-interval", &interval, "--resync-interval", &resync])
        .args(limit.iter().flat_map(|l| {
            [
                "--copy-limit-per-region",
                l,
                "--copy-limit-per-source-region",
                l,
            ]
        }))
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .env("KUBECONFIG", kubeconfig)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the operator")
}

/// Drift checks (settled objects) run every four tracking intervals here, so
/// that their cost shows within a short run.
fn resync(args: &Args) -> Duration {
    args.interval * 4
}

/// (peak RSS in MiB, CPU seconds) of a live process.
fn usage(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').collect())
        .unwrap_or_default();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    (hwm_kib / 1024.0, ticks / 100.0)
}

fn counts(sim: &Simulator) -> BTreeMap<(String, String), u64> {
    let mut m = BTreeMap::new();
    for c in sim.calls() {
        *m.entry((c.action, c.region)).or_default() += c.count;
    }
    m
}

fn describe_per_region(
    before: &BTreeMap<(String, String), u64>,
    after: &BTreeMap<(String, String), u64>,
) -> f64 {
    let per: Vec<u64> = REGIONS
        .iter()
        .map(|r| {
            let k = ("DescribeImages".to_string(), r.to_string());
            after.get(&k).copied().unwrap_or(0) - before.get(&k).copied().unwrap_or(0)
        })
        .collect();
    per.iter().sum::<u64>() as f64 / REGIONS.len() as f64
}

/// A namespace, the operator process watching it, and a reflector that counts
/// Ready objects without listing them again and again.
struct Run {
    api: Api<AmiCopy>,
    operator: Child,
    pid: u32,
    metrics_port: u16,
    reader: reflector::Store<AmiCopy>,
    watch: tokio::task::JoinHandle<()>,
}

impl Run {
    async fn start(
        kube: &Client,
        args: &Args,
        mode: &str,
        n: usize,
        endpoint: &str,
        limits: bool,
    ) -> Self {
        let namespaces: Api<Namespace> = Api::all(kube.clone());
        let mut ns_obj = Namespace::default();
        ns_obj.metadata.generate_name = Some(format!("bench-{mode}-{n}-"));
        let ns = namespaces
            .create(&PostParams::default(), &ns_obj)
            .await
            .unwrap()
            .name_any();
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let operator = spawn_operator(args, mode, &ns, endpoint, metrics_port, limits);
        let pid = operator.id().expect("operator pid");
        let api: Api<AmiCopy> = Api::namespaced(kube.clone(), &ns);
        let (reader, writer) = reflector::store();
        let watch = watcher(api.clone(), watcher::Config::default().any_semantic())
            .default_backoff()
            .reflect(writer)
            .touched_objects()
            .for_each(|_| futures::future::ready(()));
        Self {
            api,
            operator,
            pid,
            metrics_port,
            reader,
            watch: tokio::spawn(watch),
        }
    }

    fn ready(&self) -> usize {
        self.reader
            .state()
            .iter()
            .filter(|o| {
                o.status.as_ref().is_some_and(|s| {
                    s.observed_generation == o.metadata.generation
                        && s.conditions
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            })
            .count()
    }

    /// Seconds until `n` objects are Ready, or `None` past `deadline`.
    async fn until_ready(&self, n: usize, deadline: Duration) -> Option<f64> {
        let since = Instant::now();
        while since.elapsed() < deadline {
            if self.ready() >= n {
                return Some(since.elapsed().as_secs_f64());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Applies `n` AmiCopies of `source`, 32 at a time; returns the seconds taken.
    async fn apply(&self, source: &str, n: usize) -> f64 {
        let start = Instant::now();
        stream::iter(0..n)
            .map(|i| {
                let api = self.api.clone();
                let obj: AmiCopy = serde_json::from_value(json!({
                    "apiVersion": "amicopy.dev/v1alpha1", "kind": "AmiCopy",
                    "metadata": {"name": format!("copy-{i:05}")},
                    "spec": {"source": {"region": "us-east-1", "imageId": source},
                             "destinations": REGIONS.iter().map(|r| json!({"region": r})).collect::<Vec<_>>(),
                             "name": format!("bench-{i:05}"),
                             "publish": {"configMap": {"name": format!("copy-{i:05}-ids")}}},
                }))
                .unwrap();
                async move { api.create(&PostParams::default(), &obj).await.map(drop) }
            })
            .buffer_unordered(32)
            .try_collect::<Vec<_>>()
            .await
            .expect("create the AmiCopies");
        start.elapsed().as_secs_f64()
    }

    /// EC2 calls by operation as the operator counts them (its /metrics).
    async fn operator_calls(&self) -> BTreeMap<String, u64> {
        self.operator_counter("amicopy_ec2_calls_total{", "operation")
            .await
    }

    /// Reconciles so far, whatever their outcome (the operator's count).
    async fn reconciles(&self) -> u64 {
        let by_outcome = self
            .operator_counter("amicopy_reconciles_total{", "outcome")
            .await;
        by_outcome.values().sum()
    }

    /// A counter of the operator's /metrics, summed by one label.
    async fn operator_counter(&self, prefix: &str, label: &str) -> BTreeMap<String, u64> {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .await
            .expect("metrics");
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        conn.read_to_string(&mut body).await.unwrap();
        let mut out = BTreeMap::new();
        for line in body.lines().filter(|l| l.starts_with(prefix)) {
            let value = line
                .split(&format!("{label}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("?");
            let n: u64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0) as u64;
            *out.entry(value.to_owned()).or_default() += n;
        }
        out
    }

    /// Moves every object to `source` (a merge patch, 32 at a time).
    async fn move_to(&self, source: &str, n: usize) {
        stream::iter(0..n)
            .map(|i| {
                let api = self.api.clone();
                let patch = json!({"spec": {"source": {"region": "us-east-1", "imageId": source}}});
                async move {
                    api.patch(
                        &format!("copy-{i:05}"),
                        &kube::api::PatchParams::default(),
                        &kube::api::Patch::Merge(patch),
                    )
                    .await
                    .map(drop)
                }
            })
            .buffer_unordered(32)
            .try_collect::<Vec<_>>()
            .await
            .expect("patch the AmiCopies");
    }

    /// Objects that published the copies of `source` and retired the rest.
    fn rolled_out(&self, source: &str) -> usize {
        self.reader
            .state()
            .iter()
            .filter(|o| {
                o.status.as_ref().is_some_and(|s| {
                    s.retiring.is_empty()
                        && s.published
                            .as_ref()
                            .is_some_and(|p| p.source_image_id == source)
                })
            })
            .count()
    }

    async fn stop(mut self) -> (f64, f64) {
        let usage = usage(self.pid);
        let _ = self.operator.start_kill();
        let _ = self.operator.wait().await;
        self.watch.abort();
        usage
    }
}

fn deadline(n: usize) -> Duration {
    Duration::from_secs(60 + n as u64 / 5)
}

async fn scenario(kube: &Client, args: &Args, mode: &str, n: usize) -> Row {
    let sim = Simulator::start(sim_config())
        .await
        .expect("start the simulator");
    let source = sim.seed_image(SeedImage {
        region: "us-east-1".into(),
        name: format!("bench-{mode}-{n}"),
        ..SeedImage::default()
    });
    let run = Run::start(kube, args, mode, n, &sim.endpoint(), false).await;
    let start = Instant::now();
    let apply_s = run.apply(&source, n).await;

    let mut issue_s = None;
    while start.elapsed() < deadline(n) {
        if copies_issued(&sim) >= 3 * n {
            issue_s = Some(start.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Tracking cost while every copy is pending.
    let window = args.interval * 3;
    let before = counts(&sim);
    tokio::time::sleep(window).await;
    let describe_pending_per_interval = describe_per_region(&before, &counts(&sim)) / 3.0;

    let requests_before = apiserver_requests(kube).await;
    let cpu_before = cpu_by_process(run.pid);
    sim.finish_copies();
    let ready_s = run.until_ready(n, deadline(n)).await;
    let ready_cpu = cpu_by_process(run.pid)
        .into_iter()
        .zip(cpu_before)
        .map(|((name, after), (_, before))| (name, after - before))
        .collect();
    let ready_requests = apiserver_requests(kube)
        .await
        .into_iter()
        .map(|(what, after)| {
            let delta = after - requests_before.get(&what).copied().unwrap_or(0);
            (what, delta)
        })
        .filter(|(_, d)| *d > 0)
        .collect();

    // Steady state: everything available; two drift periods.
    tokio::time::sleep(args.interval).await;
    let before = counts(&sim);
    tokio::time::sleep(resync(args) * 2).await;
    let after = counts(&sim);
    let describe_steady_per_resync = describe_per_region(&before, &after) / 2.0;
    let steady_total: u64 = after
        .iter()
        .map(|(k, v)| v - before.get(k).copied().unwrap_or(0))
        .sum();

    let cycle = counts(&sim);
    // The copy cycle's own footprint, before the rollout phase adds its own.
    let (rss_mib, cpu_s) = usage(run.pid);
    let rollout = if n <= args.rollout_max {
        Some(rollout(&sim, &run, n).await)
    } else {
        None
    };

    let mut calls = BTreeMap::new();
    for ((action, _), c) in cycle {
        if !matches!(
            action.as_str(),
            "RegisterImage" | "CreateVolume" | "CreateSnapshot"
        ) {
            *calls.entry(action).or_default() += c;
        }
    }
    let (rollout_rss, rollout_cpu) = run.stop().await;
    let rollout = rollout.map(|r| Rollout {
        peak_rss_mib: rollout_rss,
        cpu_s: rollout_cpu - cpu_s,
        ..r
    });
    Row {
        mode: mode.into(),
        n,
        apply_s,
        issue_s,
        ready_s,
        calls,
        describe_pending_per_interval,
        describe_steady_per_resync,
        steady_calls_per_object: steady_total as f64 / n as f64 / 2.0,
        rss_mib,
        cpu_s,
        ready_cpu,
        ready_requests,
        rollout,
    }
}

/// Every object moves to a new source: N × 3 copies, then publication of
/// their IDs, the in-use look-ups of the old copies and their retirement.
async fn rollout(sim: &Simulator, run: &Run, n: usize) -> Rollout {
    let next = sim.seed_image(SeedImage {
        region: "us-east-1".into(),
        name: format!("bench-next-{n}"),
        ..SeedImage::default()
    });
    let before = counts(sim);
    let reconciles = run.reconciles().await;
    let start = Instant::now();
    run.move_to(&next, n).await;
    while start.elapsed() < deadline(n) && copies_issued(sim) < 6 * n {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sim.finish_copies();
    let mut done_s = None;
    while start.elapsed() < deadline(n) * 2 {
        if run.rolled_out(&next) >= n {
            done_s = Some(start.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut calls = BTreeMap::new();
    for (key, after) in counts(sim) {
        let delta = after - before.get(&key).copied().unwrap_or(0);
        if delta > 0
            && !matches!(
                key.0.as_str(),
                "RegisterImage" | "CreateVolume" | "CreateSnapshot"
            )
        {
            *calls.entry(key.0).or_default() += delta;
        }
    }
    Rollout {
        done_s,
        calls,
        reconciles: run.reconciles().await - reconciles,
        ..Rollout::default()
    }
}

/// Copy admission against its limits: the operator's default limits (50
/// per destination region, 25 per source region; every copy here comes from
/// one source region, so 25 at once bind) and a simulator whose copies take
/// `--copy-secs` and which refuses a 51st copy per region as EC2 does.
/// Ideal: copies start in waves of 25, one wave per copy time, so the last
/// one starts after floor((3N - 1) / 25) copy times and all are done one
/// copy time later. The measured excess is the time a freed slot takes to
/// be noticed (the tracker's next round) and filled.
async fn paced_scenario(kube: &Client, args: &Args, n: usize) {
    const LIMIT: usize = 25;
    let mut config = sim_config();
    config.copy_duration = args.copy;
    config.concurrent_copy_limit = 50;
    let sim = Simulator::start(config).await.expect("start the simulator");
    let source = sim.seed_image(SeedImage {
        region: "us-east-1".into(),
        name: format!("bench-paced-{n}"),
        ..SeedImage::default()
    });
    let run = Run::start(kube, args, "batched", n, &sim.endpoint(), true).await;
    let start = Instant::now();
    run.apply(&source, n).await;
    let copies = 3 * n;
    let waves = (copies - 1) / LIMIT;
    let ideal_issue = args.copy.as_secs_f64() * waves as f64;
    let ideal_ready = args.copy.as_secs_f64() * (waves + 1) as f64;
    let deadline = Duration::from_secs_f64(ideal_ready * 3.0) + Duration::from_secs(60);
    let (mut issue_s, mut ready_s) = (None, None);
    let (mut samples, mut in_flight_sum, mut most) = (0u64, 0usize, 0usize);
    while start.elapsed() < deadline && ready_s.is_none() {
        let running = sim.copies_running();
        most = most.max(running);
        if issue_s.is_none() {
            samples += 1;
            in_flight_sum += running;
            if copies_issued(&sim) >= copies {
                issue_s = Some(start.elapsed().as_secs_f64());
            }
        }
        if run.ready() >= n {
            ready_s = Some(start.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused: u64 = sim
        .calls()
        .iter()
        .filter(|c| c.outcome == "ResourceLimitExceeded")
        .map(|c| c.count)
        .sum();
    run.stop().await;
    println!(
        "| batched | {n} | {} | {} ({ideal_issue:.0}) | {} ({ideal_ready:.0}) | {:.1} / {LIMIT} | {most} | {refused} |",
        args.copy.as_secs(),
        seconds(issue_s),
        seconds(ready_s),
        in_flight_sum as f64 / samples.max(1) as f64,
    );
}

/// The same objects against moto: copies are available at once there, so
/// only apply → all Ready, the calls (counted by the operator: moto keeps no
/// count) and the operator's footprint are measured.
async fn moto_scenario(kube: &Client, args: &Args, endpoint: &str, n: usize) {
    let source = seed_moto(endpoint).await;
    let run = Run::start(kube, args, "batched", n, endpoint, false).await;
    let start = Instant::now();
    let apply_s = run.apply(&source, n).await;
    let ready_s = run.until_ready(n, deadline(n)).await;
    let total = start.elapsed().as_secs_f64();
    let calls = run.operator_calls().await;
    let ready = run.ready();
    let (rss_mib, cpu_s) = run.stop().await;
    let per_op: Vec<String> = calls
        .iter()
        .map(|(op, c)| format!("{op} {:.2}", *c as f64 / n as f64))
        .collect();
    println!(
        "| moto | {n} | {apply_s:.1} | {} | {ready}/{n} | {} | {rss_mib:.1} | {cpu_s:.1} |",
        ready_s.map_or(
            format!("not within {:.0} s", deadline(n).as_secs_f64()),
            |_| format!("{total:.1}")
        ),
        per_op.join(", "),
    );
}

/// A source image in moto, registered the way a person would.
async fn seed_moto(endpoint: &str) -> String {
    let conf = aws_sdk_ec2::config::Builder::new()
        .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            ACCESS_KEY, SECRET_KEY, None, None, "bench",
        ))
        .build();
    let ec2 = aws_sdk_ec2::Client::from_conf(conf);
    let vol = ec2
        .create_volume()
        .availability_zone("us-east-1a")
        .size(8)
        .send()
        .await
        .expect("CreateVolume");
    let snap = ec2
        .create_snapshot()
        .volume_id(vol.volume_id().unwrap())
        .send()
        .await
        .expect("CreateSnapshot");
    let mapping = aws_sdk_ec2::types::BlockDeviceMapping::builder()
        .device_name("/dev/xvda")
        .ebs(
            aws_sdk_ec2::types::EbsBlockDevice::builder()
                .snapshot_id(snap.snapshot_id().unwrap())
                .build(),
        )
        .build();
    let name = format!("bench-moto-{}", std::process::id());
    let img = ec2
        .register_image()
        .name(name)
        .root_device_name("/dev/xvda")
        .block_device_mappings(mapping)
        .send()
        .await
        .expect("RegisterImage");
    img.image_id().unwrap().to_owned()
}
