//! A real kube-apiserver + etcd for tests (scripts/kube-apiserver.sh), one per test binary.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

use super::{repo, spawn_tied_to_test_process};

/// The API server this test binary uses.
pub struct KubeApiServer {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
}

impl KubeApiServer {
    /// Starts it once (building it first if the cache is empty) and shares it.
    pub fn shared() -> &'static KubeApiServer {
        static SERVER: OnceLock<KubeApiServer> = OnceLock::new();
        SERVER.get_or_init(Self::start)
    }

    fn start() -> KubeApiServer {
        let script = repo().join("scripts/kube-apiserver.sh");
        let install = Command::new("bash")
            .arg(&script)
            .arg("install")
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/kube-apiserver.sh install");
        assert!(
            install.status.success(),
            "scripts/kube-apiserver.sh install failed"
        );
        let dir = tempfile::Builder::new()
            .prefix("pao-kube-")
            .tempdir()
            .expect("tempdir")
            .keep();
        let log = std::fs::File::create(dir.join("run.log")).expect("log");
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .arg("run")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        spawn_tied_to_test_process(cmd);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !dir.join("ready").exists() {
            assert!(
                Instant::now() < deadline,
                "the API server did not start; see {}",
                dir.join("run.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        KubeApiServer {
            kubeconfig: dir.join("kubeconfig"),
            dir,
        }
    }

    /// An admin client from the kubeconfig the script wrote.
    pub async fn client(&self) -> Client {
        prefect_agent_operator::install_crypto_provider();
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("config");
        Client::try_from(config).expect("client")
    }
}
