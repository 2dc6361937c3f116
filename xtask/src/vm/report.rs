//! The matrix report: `target/vm-report/report.json` (one row per image and
//! scenario), `report.md`, and `report.html` (the image x scenario grid, each
//! cell linking to its console log and message, the tool versions of each
//! image), plus the console logs and transcripts under `logs/`. The page is
//! checked in headless chromium (Debian's) when it is installed, or always
//! in CI: its script must have counted the cells, and a screenshot is kept.
use super::image::Image;
use super::scenario::Scenario;
use crate::util::{have, in_ci, root, step};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Row {
    pub image: String,
    pub init: String,
    pub root_layout: String,
    pub scenario: String,
    pub status: String,
    pub seconds: f64,
    /// The console log (absolute until the report copies it).
    pub log: Option<PathBuf>,
    pub message: String,
    pub step: String,
    pub console_tail: String,
}

impl Row {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        img: &Image,
        scenario: &str,
        pass: bool,
        seconds: f64,
        message: &str,
        step: &str,
        log: Option<PathBuf>,
        console_tail: String,
    ) -> Row {
        Row {
            image: img.name.into(),
            init: img.init.name().into(),
            root_layout: img.layout.describe().into(),
            scenario: scenario.into(),
            status: if pass { "pass" } else { "fail" }.into(),
            seconds,
            log,
            message: message.into(),
            step: step.into(),
            console_tail,
        }
    }
}

pub struct ImageResult {
    pub image: &'static Image,
    pub versions: Vec<(String, String)>,
    pub build_seconds: f64,
    pub seconds: f64,
    pub rows: Vec<Row>,
}

pub fn out_dir() -> PathBuf {
    root().join("target/vm-report")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Copy the logs of a run next to the report; the rows then name them
/// relative to the report directory.
fn copy_logs(out: &Path, results: &[ImageResult]) -> Result<Vec<Vec<String>>> {
    let logs = out.join("logs");
    let mut rel = Vec::new();
    for r in results {
        let mut v = Vec::new();
        for row in &r.rows {
            let l = match &row.log {
                Some(p) if p.exists() => {
                    let chain = p.parent().and_then(|d| d.file_name()).map(|s| s.to_string_lossy().into_owned());
                    let name = format!(
                        "{}-{}-{}",
                        r.image.name,
                        chain.unwrap_or_default(),
                        p.file_name().unwrap().to_string_lossy()
                    );
                    std::fs::copy(p, logs.join(&name))?;
                    // The chain's transcript (guest commands, job results) too.
                    if let Some(dir) = p.parent() {
                        for e in std::fs::read_dir(dir)?.flatten() {
                            let n = e.file_name().to_string_lossy().into_owned();
                            if n.starts_with("transcript-") {
                                std::fs::copy(e.path(), logs.join(format!("{}-{n}", r.image.name)))?;
                            }
                        }
                    }
                    format!("logs/{name}")
                }
                _ => String::new(),
            };
            v.push(l);
        }
        rel.push(v);
    }
    Ok(rel)
}

pub fn write(results: &[ImageResult], scens: &[&Scenario], total: f64) -> Result<PathBuf> {
    let out = out_dir();
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    std::fs::create_dir_all(out.join("logs"))?;
    let rel = copy_logs(&out, results)?;
    let mut rows = Vec::new();
    let mut images = Vec::new();
    for (r, rl) in results.iter().zip(&rel) {
        images.push(json!({
            "image": r.image.name,
            "suite": r.image.suite,
            "init": r.image.init.name(),
            "root_layout": r.image.layout.describe(),
            "versions": r.versions.iter().map(|(k, v)| (k.clone(), Value::from(v.clone()))).collect::<serde_json::Map<_, _>>(),
            "build_seconds": r.build_seconds.round(),
            "seconds": r.seconds.round(),
        }));
        for (row, l) in r.rows.iter().zip(rl) {
            rows.push(json!({
                "image": row.image,
                "init": row.init,
                "root_layout": row.root_layout,
                "scenario": row.scenario,
                "status": row.status,
                "seconds": (row.seconds * 10.0).round() / 10.0,
                "log": l,
                "message": row.message,
                "step": row.step,
                "console_tail": row.console_tail,
            }));
        }
    }
    let names: Vec<&str> = scens.iter().map(|s| s.name).collect();
    let doc = json!({"total_seconds": total.round(), "scenarios": names, "images": images, "rows": rows});
    std::fs::write(out.join("report.json"), serde_json::to_vec_pretty(&doc)?)?;
    std::fs::write(out.join("report.md"), markdown(&doc))?;
    std::fs::write(out.join("report.html"), html(&doc))?;
    Ok(out)
}

fn cell<'a>(doc: &'a Value, image: &str, scenario: &str) -> Option<&'a Value> {
    doc["rows"].as_array()?.iter().find(|r| r["image"] == image && r["scenario"] == scenario)
}

fn markdown(doc: &Value) -> String {
    let names: Vec<&str> = doc["scenarios"].as_array().into_iter().flatten().filter_map(|s| s.as_str()).collect();
    let mut s = String::from("# VM matrix report\n\n");
    s.push_str("| image | init | root layout | ");
    s.push_str(&names.join(" | "));
    s.push_str(" |\n|---|---|---|");
    s.push_str(&"---|".repeat(names.len()));
    s.push('\n');
    for i in doc["images"].as_array().into_iter().flatten() {
        let name = i["image"].as_str().unwrap_or("");
        s.push_str(&format!(
            "| {name} | {} | {} |",
            i["init"].as_str().unwrap_or(""),
            i["root_layout"].as_str().unwrap_or("")
        ));
        for n in &names {
            let c = cell(doc, name, n);
            let st = c.map(|c| if c["status"] == "pass" { "pass" } else { "**FAIL**" }).unwrap_or("missing");
            s.push_str(&format!(" {st} |"));
        }
        s.push('\n');
    }
    s.push_str("\n## Tool versions\n\n");
    for i in doc["images"].as_array().into_iter().flatten() {
        let v: Vec<String> = i["versions"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or("")))
            .collect();
        s.push_str(&format!(
            "- {} (built in {} s, run {} s): {}\n",
            i["image"].as_str().unwrap_or(""),
            i["build_seconds"],
            i["seconds"],
            v.join(", ")
        ));
    }
    s.push_str("\n## Red cells\n\n");
    let mut red = 0;
    for r in doc["rows"].as_array().into_iter().flatten().filter(|r| r["status"] != "pass") {
        red += 1;
        s.push_str(&format!(
            "- {} / {} (step: {}): {} [log]({})\n",
            r["image"].as_str().unwrap_or(""),
            r["scenario"].as_str().unwrap_or(""),
            r["step"].as_str().unwrap_or(""),
            r["message"].as_str().unwrap_or("").replace('\n', " "),
            r["log"].as_str().unwrap_or("")
        ));
    }
    if red == 0 {
        s.push_str("None.\n");
    }
    s
}

fn html(doc: &Value) -> String {
    let names: Vec<&str> = doc["scenarios"].as_array().into_iter().flatten().filter_map(|s| s.as_str()).collect();
    let mut h = String::from(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>VM matrix</title>\n<style>\n\
         body{font-family:sans-serif;margin:1em} table{border-collapse:collapse} \
         td,th{border:1px solid #999;padding:4px 6px;font-size:13px} th.s{writing-mode:vertical-rl;transform:rotate(180deg)} \
         td.pass{background:#7c7} td.fail{background:#e66} td.missing{background:#ccc} td.c a{color:#000;text-decoration:none} \
         .v{font-size:12px;color:#333}\n</style></head><body>\n<h1>VM matrix</h1>\n<p id=\"summary\">(counting...)</p>\n\
         <table id=\"grid\"><tr><th>image</th><th>init</th><th>root layout</th>",
    );
    for n in &names {
        h.push_str(&format!("<th class=\"s\">{}</th>", esc(n)));
    }
    h.push_str("<th>versions</th></tr>\n");
    for i in doc["images"].as_array().into_iter().flatten() {
        let name = i["image"].as_str().unwrap_or("");
        h.push_str(&format!(
            "<tr><th>{}</th><td>{}</td><td>{}</td>",
            esc(name),
            esc(i["init"].as_str().unwrap_or("")),
            esc(i["root_layout"].as_str().unwrap_or(""))
        ));
        for n in &names {
            match cell(doc, name, n) {
                Some(c) => {
                    let st = if c["status"] == "pass" { "pass" } else { "fail" };
                    let title = format!(
                        "{} s; step: {}; {}",
                        c["seconds"],
                        c["step"].as_str().unwrap_or(""),
                        c["message"].as_str().unwrap_or("")
                    );
                    let log = c["log"].as_str().unwrap_or("");
                    let label = if st == "pass" { "&#10003;" } else { "&#10007;" };
                    h.push_str(&format!(
                        "<td class=\"c {st}\" data-image=\"{}\" data-scenario=\"{}\" title=\"{}\"><a href=\"{}\">{label}</a></td>",
                        esc(name),
                        esc(n),
                        esc(&title),
                        esc(if log.is_empty() { "#" } else { log })
                    ));
                }
                None => h.push_str("<td class=\"c missing\">?</td>"),
            }
        }
        let v: Vec<String> = i["versions"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{} {}", esc(k), esc(v.as_str().unwrap_or(""))))
            .collect();
        h.push_str(&format!("<td class=\"v\">{}</td></tr>\n", v.join("<br>")));
    }
    h.push_str("</table>\n<h2>Messages</h2>\n<ul>\n");
    for r in doc["rows"].as_array().into_iter().flatten() {
        h.push_str(&format!(
            "<li class=\"{}\"><b>{} / {}</b> ({} s, {}): {} <a href=\"{}\">console</a></li>\n",
            esc(r["status"].as_str().unwrap_or("")),
            esc(r["image"].as_str().unwrap_or("")),
            esc(r["scenario"].as_str().unwrap_or("")),
            r["seconds"],
            esc(r["status"].as_str().unwrap_or("")),
            esc(r["message"].as_str().unwrap_or("")),
            esc(r["log"].as_str().unwrap_or("#"))
        ));
    }
    h.push_str(
        "</ul>\n<script>\nconst p=document.querySelectorAll('td.pass').length, f=document.querySelectorAll('td.fail').length, \
         m=document.querySelectorAll('td.missing').length;\n\
         document.getElementById('summary').textContent='cells: '+p+' pass, '+f+' fail, '+m+' missing';\n</script>\n</body></html>\n",
    );
    h
}

/// Open the page in headless chromium: its script must report the counts
/// of the report, and a screenshot is kept. Required in CI; elsewhere run
/// when chromium is installed.
pub fn check_in_browser(out: &Path, results: &[ImageResult]) -> Result<()> {
    let bin = ["chromium", "chromium-browser"].into_iter().find(|b| have(b));
    let Some(bin) = bin else {
        if in_ci() {
            bail!("chromium is not installed (cargo xtask setup installs it); CI=true requires the report page check");
        }
        eprintln!("    note: chromium is not installed; the report page was not checked in a browser");
        return Ok(());
    };
    step("vm: checking report.html in headless chromium");
    let rows: Vec<&Row> = results.iter().flat_map(|r| r.rows.iter()).collect();
    let pass = rows.iter().filter(|r| r.status == "pass").count();
    let want = format!("cells: {pass} pass, {} fail, 0 missing", rows.len() - pass);
    let page = format!("file://{}", out.join("report.html").display());
    let profile = out.join("chromium-profile");
    let _ = std::fs::remove_dir_all(&profile);
    let flags = |c: &mut Command| {
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()));
    };
    let mut c = Command::new(bin);
    flags(&mut c);
    let o = c.args(["--dump-dom", &page]).output().context("cannot run chromium")?;
    let dom = String::from_utf8_lossy(&o.stdout);
    ensure!(
        dom.contains(&want),
        "chromium's rendering of report.html does not say {want:?} (exit {}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr).lines().rev().take(5).collect::<Vec<_>>().join(" | ")
    );
    let shot = out.join("report.png");
    let mut c = Command::new(bin);
    flags(&mut c);
    let o = c
        .arg(format!("--screenshot={}", shot.display()))
        .args(["--window-size=1600,900", "--hide-scrollbars", &page])
        .output()
        .context("cannot run chromium")?;
    ensure!(shot.exists(), "chromium wrote no screenshot (exit {}): {}", o.status, String::from_utf8_lossy(&o.stderr));
    let _ = std::fs::remove_dir_all(&profile);
    eprintln!("    chromium rendered the grid ({want}); screenshot {}", shot.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    fn doc() -> serde_json::Value {
        json!({
            "scenarios": ["install", "check-in"],
            "images": [{"image": "debian-12", "init": "systemd", "root_layout": "gpt/ext4", "versions": {"kernel": "6.1.0"}}],
            "rows": [
                {"image": "debian-12", "scenario": "install", "status": "pass", "seconds": 3.0, "log": "logs/a.log",
                 "message": "ok", "step": "s"},
                {"image": "debian-12", "scenario": "check-in", "status": "fail", "seconds": 9.0, "log": "logs/a.log",
                 "message": "no <check-in>", "step": "waiting"}
            ]
        })
    }

    #[test]
    fn grid_has_one_cell_per_row_with_links_and_escaping() {
        let h = super::html(&doc());
        assert_eq!(h.matches("<td class=\"c pass\"").count(), 1);
        assert_eq!(h.matches("<td class=\"c fail\"").count(), 1);
        assert!(h.contains("href=\"logs/a.log\""));
        assert!(h.contains("no &lt;check-in&gt;") && !h.contains("no <check-in>"));
        assert!(h.contains("kernel 6.1.0"));
    }

    #[test]
    fn markdown_lists_red_cells_with_reason() {
        let m = super::markdown(&doc());
        assert!(m.contains("| debian-12 | systemd | gpt/ext4 | pass | **FAIL** |"), "{m}");
        assert!(m.contains("- debian-12 / check-in (step: waiting): no <check-in>"), "{m}");
    }
}
