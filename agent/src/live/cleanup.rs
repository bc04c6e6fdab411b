//! After a killed cycle: finding and removing every export, job and node Rewind left in a VM
//! (by name prefix), so the next cycle starts from a clean VM.

use super::*;

/// Removes every export, job and fleecing node a previous (possibly killed) cycle left, and
/// stops our NBD server. Bitmaps are kept: they hold changes. Returns what it removed.
pub async fn cleanup(qmp: &mut Qmp, work: &Workdir) -> Result<Vec<String>, QmpError> {
    let mut removed = Vec::new();
    let exports = qmp.execute("query-block-exports", json!({})).await?;
    for e in exports.as_array().into_iter().flatten() {
        if let Some(id) = e["id"].as_str().filter(|i| i.starts_with(PREFIX)) {
            qmp.execute("block-export-del", json!({"id": id, "mode": "hard"}))
                .await?;
            removed.push(format!("export {id}"));
        }
    }
    wait_gone(qmp, "query-block-exports", "id").await?;
    let jobs = qmp.execute("query-block-jobs", json!({})).await?;
    for j in jobs.as_array().into_iter().flatten() {
        if let Some(id) = j["device"].as_str().filter(|i| i.starts_with(PREFIX)) {
            qmp.execute("block-job-cancel", json!({"device": id, "force": true}))
                .await?;
            removed.push(format!("job {id}"));
        }
    }
    wait_gone(qmp, "query-block-jobs", "device").await?;
    // Parents before children: the snapshot reads through the filter; the device goes back to
    // its disk (the filter unshares writes on the disk while a snapshot reads through it); the
    // filter writes to the fleecing image. A device still on our filter is one whose agent died
    // mid-cycle.
    del_nodes(qmp, "snap-", &mut removed).await?;
    for (qdev, node) in filtered_devices(qmp).await? {
        qmp.execute(
            "qom-set",
            json!({"path": qdev, "property": "drive", "value": node}),
        )
        .await?;
        removed.push(format!("filter under {qdev}"));
    }
    del_nodes(qmp, "cbw-", &mut removed).await?;
    del_nodes(qmp, "fleece-", &mut removed).await?;
    if work.socket().exists() {
        match qmp.execute("nbd-server-stop", json!({})).await {
            Ok(_) => removed.push("nbd server".into()),
            Err(QmpError::Command { .. }) => {}
            Err(e) => return Err(e),
        }
        let _ = std::fs::remove_file(work.socket());
    }
    if let Ok(rd) = std::fs::read_dir(&work.dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("fleece-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(removed)
}

/// Deletes every node named `rewind-KIND*`.
async fn del_nodes(qmp: &mut Qmp, kind: &str, removed: &mut Vec<String>) -> Result<(), QmpError> {
    let prefix = format!("{PREFIX}{kind}");
    let nodes = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await?;
    let mut ours: Vec<String> = nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["node-name"].as_str())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    ours.sort();
    ours.dedup();
    for n in ours {
        qmp.execute("blockdev-del", json!({"node-name": n})).await?;
        removed.push(format!("node {n}"));
    }
    Ok(())
}

async fn wait_gone(qmp: &mut Qmp, query: &str, key: &str) -> Result<(), QmpError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = qmp.execute(query, json!({})).await?;
        let left = list
            .as_array()
            .into_iter()
            .flatten()
            .any(|v| v[key].as_str().is_some_and(|s| s.starts_with(PREFIX)));
        if !left {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(QmpError::Timeout(format!("{query} still lists {PREFIX}*")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The devices whose drive is one of our copy-before-write filters, with the node each one
/// wrote to before (the filter's `file` child).
async fn filtered_devices(qmp: &mut Qmp) -> Result<Vec<(String, String)>, QmpError> {
    let cbw = format!("{PREFIX}cbw-");
    let blocks = qmp.execute("query-block", json!({})).await?;
    let filtered: Vec<(String, String)> = blocks
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| {
            let node = b["inserted"]["node-name"].as_str()?;
            let qdev = b["qdev"].as_str().filter(|q| !q.is_empty())?;
            node.starts_with(&cbw)
                .then(|| (qdev.to_owned(), node.to_owned()))
        })
        .collect();
    if filtered.is_empty() {
        return Ok(Vec::new());
    }
    let graph = qmp.execute("x-debug-query-block-graph", json!({})).await?;
    let name_of = |id: &Value| {
        graph["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| &n["id"] == id)
            .and_then(|n| n["name"].as_str())
    };
    let mut out = Vec::new();
    for (qdev, filter) in filtered {
        let child = graph["edges"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == "file" && name_of(&e["parent"]) == Some(filter.as_str()))
            .and_then(|e| name_of(&e["child"]));
        match child {
            Some(node) => out.push((qdev, node.to_owned())),
            None => {
                return Err(QmpError::Timeout(format!(
                    "cannot find the disk under filter {filter}"
                )))
            }
        }
    }
    Ok(out)
}
