//! `ami-copy-operator`: `run` starts the controller, `crd` prints the CRD.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ami_copy_operator::config::Config;
use ami_copy_operator::controller::{self, Context};
use ami_copy_operator::ec2::AwsEc2;
use ami_copy_operator::leader::{self, LeaseConfig};
use ami_copy_operator::metrics::Metrics;
use ami_copy_operator::{AmiCopy, server};
use clap::{Parser, Subcommand, ValueEnum};
use kube::api::{Api, ListParams};
use tokio::sync::watch;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    version,
    about = "Kubernetes operator that copies AMIs across AWS regions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller.
    Run(Box<RunArgs>),
    /// Print a CustomResourceDefinition as YAML.
    Crd {
        /// The kind: AmiCopy, or AmiCopyPolicy.
        #[arg(long, default_value = "AmiCopy")]
        kind: String,
    },
}

#[derive(Parser)]
struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// EC2 endpoint URL for every region (local EC2 peers, VPC endpoints).
    /// AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_EC2 work too.
    #[arg(long, env = "AMICOPY_EC2_ENDPOINT_URL")]
    ec2_endpoint_url: Option<String>,
    /// STS endpoint URL for the roles of cross-account destinations (local
    /// peers); AWS_ENDPOINT_URL_STS works too.
    #[arg(long, env = "AMICOPY_STS_ENDPOINT_URL")]
    sts_endpoint_url: Option<String>,
    /// SSM endpoint URL for `spec.publish.ssmParameter` (local peers);
    /// AWS_ENDPOINT_URL_SSM works too.
    #[arg(long, env = "AMICOPY_SSM_ENDPOINT_URL")]
    ssm_endpoint_url: Option<String>,
    /// Address of /metrics, /livez and /readyz.
    #[arg(long, env = "AMICOPY_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    #[command(flatten)]
    config: Config,
    /// Log format.
    #[arg(long, env = "AMICOPY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Reconcile only while holding a coordination.k8s.io Lease, so that
    /// several replicas are safe.
    #[arg(long, env = "AMICOPY_LEADER_ELECTION")]
    leader_election: bool,
    /// Namespace of the Lease (default: the client's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(long, env = "AMICOPY_LEASE_NAME", default_value = "ami-copy-operator")]
    lease_name: String,
    /// A leader that has not renewed the Lease for this long is replaced.
    #[arg(long, env = "AMICOPY_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// Threads that run the controller. The operator's work is mostly
    /// waiting on the API server and EC2: one thread does it with the least
    /// CPU and memory per object (no hand-offs between threads); more help
    /// only when one thread's core is saturated.
    #[arg(long, env = "AMICOPY_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    worker_threads: u16,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Run(args) => args.worker_threads,
        Command::Crd { .. } => 1,
    };
    let mut runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut multi = tokio::runtime::Builder::new_multi_thread();
        multi.worker_threads(threads.into());
        multi
    };
    runtime.enable_all().build()?.block_on(command(cli))
}

async fn command(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crd { kind } => match kind.as_str() {
            "AmiCopy" => {
                print!("{}", ami_copy_operator::crd_yaml());
                Ok(())
            }
            "AmiCopyPolicy" => {
                print!("{}", ami_copy_operator::policy_crd_yaml());
                Ok(())
            }
            other => anyhow::bail!("no CRD of kind {other}: AmiCopy or AmiCopyPolicy"),
        },
        Command::Run(args) => run(*args).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }

    let client = kube::Client::try_default().await?;
    let metrics = Arc::new(Metrics::default());
    let ec2 = AwsEc2::from_env(args.ec2_endpoint_url, metrics.clone())
        .await
        .with_sts_endpoint(args.sts_endpoint_url)
        .with_ssm_endpoint(args.ssm_endpoint_url);
    let ctx = Arc::new(Context::new(
        client.clone(),
        ec2,
        metrics.clone(),
        args.config,
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutting down");
        let _ = stop_tx.send(true);
    });

    let ready = Arc::new(AtomicBool::new(false));
    tokio::spawn(wait_for_api(
        client.clone(),
        args.namespace.clone(),
        ready.clone(),
    ));
    let http = tokio::spawn(server::serve(
        args.metrics_addr,
        metrics,
        ready,
        stopped(stop_rx.clone()),
    ));

    info!(
        namespace = args.namespace.as_deref().unwrap_or("<all>"),
        "starting controller"
    );
    if args.leader_election {
        let lease = LeaseConfig {
            namespace: args
                .leader_election_namespace
                .unwrap_or_else(|| client.default_namespace().to_owned()),
            name: args.lease_name,
            identity: std::env::var("POD_NAME")
                .or_else(|_| std::env::var("HOSTNAME"))
                .unwrap_or_else(|_| format!("ami-copy-operator-{}", std::process::id())),
            duration: args.lease_duration,
        };
        let namespace = args.namespace;
        leader::run(client, lease, stop_rx, |lost| {
            controller::run(ctx.clone(), namespace.clone(), lost.wait())
        })
        .await?;
    } else {
        controller::run(ctx, args.namespace, stopped(stop_rx)).await;
    }
    http.await??;
    Ok(())
}

/// Ready once the AmiCopy API answers (the CRD is installed and RBAC allows
/// listing it).
async fn wait_for_api(client: kube::Client, namespace: Option<String>, ready: Arc<AtomicBool>) {
    let api: Api<AmiCopy> = match &namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    loop {
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => {
                ready.store(true, Ordering::Relaxed);
                return;
            }
            Err(e) => warn!(error = %e, "the AmiCopy API is not available yet"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}
