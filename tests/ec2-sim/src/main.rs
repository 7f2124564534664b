//! `ec2-sim`: the EC2 image simulator as a standalone server.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use ec2_sim::{SimConfig, Simulator};
use tokio::net::TcpListener;

/// Serve a simulated EC2 image API, with a JSON control API under /_sim/.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:5056")]
    listen: SocketAddr,
    /// How long a CopyImage stays pending, in seconds.
    #[arg(long, default_value_t = 2.0)]
    copy_seconds: f64,
    /// In-flight copies allowed per account and destination region.
    #[arg(long, default_value_t = 50)]
    concurrent_copy_limit: usize,
    /// Seed for generated ids and random faults.
    #[arg(long)]
    seed: Option<u64>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let config = SimConfig {
        copy_duration: Duration::from_secs_f64(args.copy_seconds.max(0.0)),
        concurrent_copy_limit: args.concurrent_copy_limit,
        seed: args.seed,
        ..SimConfig::default()
    };
    let listener = TcpListener::bind(args.listen).await?;
    let sim = Simulator::start_on(listener, config)?;
    eprintln!("ec2-sim listening on {}", sim.endpoint());
    tokio::select! {
        result = sim.wait() => result,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
