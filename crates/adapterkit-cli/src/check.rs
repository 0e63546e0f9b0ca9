//! `adapterkit check`: run the rule catalogue over files and directories and report in text,
//! JSON, SARIF 2.1.0 or GitHub workflow annotations.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use adapterkit_formats::Checkpoint;
use adapterkit_ops::check::{self, Finding, Severity, Target, RULES};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_json::{json, Value};

/// `check` arguments.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Adapter directories, safetensors files, or directories to search for them.
    #[arg(required_unless_present = "list_rules")]
    pub paths: Vec<PathBuf>,
    /// A base checkpoint: also check that every target exists with the right shape, the
    /// vocabulary size and tied embeddings.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Output format.
    #[arg(long, default_value = "text", value_parser = ["text", "json", "sarif", "github"])]
    pub format: String,
    /// Fail (exit 1) on warnings too, not only errors.
    #[arg(long)]
    pub strict: bool,
    /// Run only these rules (comma-separated ids).
    #[arg(long, value_delimiter = ',')]
    pub rules: Option<Vec<String>>,
    /// Treat these rules as errors.
    #[arg(long, value_delimiter = ',')]
    pub deny: Vec<String>,
    /// Do not report these rules.
    #[arg(long, value_delimiter = ',')]
    pub allow: Vec<String>,
    /// Print the rule catalogue and exit.
    #[arg(long)]
    pub list_rules: bool,
}

/// The outcome: whether anything at or above the failing severity was found.
pub enum Outcome {
    /// Nothing to fail on.
    Clean,
    /// Findings at or above the failing severity.
    Failed,
}

fn known(ids: &[String], flag: &str) -> Result<()> {
    for id in ids {
        if check::rule(id).is_none() {
            bail!("{flag} {id:?}: no such rule (adapterkit check --list-rules lists them)");
        }
    }
    Ok(())
}

/// Run `check`. Usage and I/O problems (a path that does not exist, an unreadable base) are
/// errors; findings are the outcome.
pub fn run(a: CheckArgs) -> Result<Outcome> {
    if a.list_rules {
        print_rules(&a.format)?;
        return Ok(Outcome::Clean);
    }
    if let Some(r) = &a.rules {
        known(r, "--rules")?;
    }
    known(&a.deny, "--deny")?;
    known(&a.allow, "--allow")?;
    let base = match &a.base {
        Some(p) => {
            Some(Checkpoint::open(p).with_context(|| format!("opening base {}", p.display()))?)
        }
        None => None,
    };
    let mut targets: Vec<Target> = Vec::new();
    for p in &a.paths {
        if !p.exists() {
            bail!("{}: no such file or directory", p.display());
        }
        targets.extend(check::discover(p).with_context(|| format!("reading {}", p.display()))?);
    }
    let started = std::time::Instant::now();
    let per_target: Vec<Vec<Finding>> = targets
        .par_iter()
        .map(|t| check::check_target(t, base.as_ref()))
        .collect();
    let secs = started.elapsed().as_secs_f64();
    let only: Option<BTreeSet<&str>> = a
        .rules
        .as_ref()
        .map(|r| r.iter().map(String::as_str).collect());
    let findings: Vec<Finding> = per_target
        .into_iter()
        .flatten()
        .filter(|f| only.as_ref().is_none_or(|o| o.contains(f.rule)))
        .filter(|f| !a.allow.iter().any(|x| x == f.rule))
        .map(|mut f| {
            if a.deny.iter().any(|x| x == f.rule) {
                f.severity = Severity::Error;
            }
            f
        })
        .collect();
    let fail_at = if a.strict {
        Severity::Warning
    } else {
        Severity::Error
    };
    let failed = findings.iter().any(|f| f.severity >= fail_at);
    match a.format.as_str() {
        "json" => print_json(&targets, &findings, secs, failed)?,
        "sarif" => println!("{}", serde_json::to_string_pretty(&sarif(&findings))?),
        "github" => print_github(&findings),
        _ => print_text(&targets, &findings, secs),
    }
    Ok(if failed {
        Outcome::Failed
    } else {
        Outcome::Clean
    })
}

fn print_rules(format: &str) -> Result<()> {
    if format == "json" {
        let v: Vec<Value> = RULES
            .iter()
            .map(|r| json!({"id": r.id, "name": r.name, "severity": r.severity.name(), "summary": r.summary, "rationale": r.rationale}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for r in RULES {
        println!(
            "{}  {:<7}  {:<26} {}",
            r.id,
            r.severity.name(),
            r.name,
            r.summary
        );
    }
    Ok(())
}

fn print_text(targets: &[Target], findings: &[Finding], secs: f64) {
    for f in findings {
        let item = f
            .item
            .as_deref()
            .map(|i| format!(" [{i}]"))
            .unwrap_or_default();
        println!(
            "{}: {} {}{}: {}",
            f.path.display(),
            f.rule,
            f.severity.name(),
            item,
            f.message
        );
    }
    let mut by: BTreeMap<Severity, usize> = BTreeMap::new();
    for f in findings {
        *by.entry(f.severity).or_default() += 1;
    }
    let files: BTreeSet<&PathBuf> = findings.iter().map(|f| &f.path).collect();
    println!(
        "checked {} target(s) in {:.3}s: {} error(s), {} warning(s), {} info in {} target(s)",
        targets.len(),
        secs,
        by.get(&Severity::Error).unwrap_or(&0),
        by.get(&Severity::Warning).unwrap_or(&0),
        by.get(&Severity::Info).unwrap_or(&0),
        files.len()
    );
}

fn finding_json(f: &Finding) -> Value {
    json!({
        "rule": f.rule,
        "name": check::rule(f.rule).map(|r| r.name),
        "severity": f.severity.name(),
        "path": f.path,
        "item": f.item,
        "message": f.message,
    })
}

fn print_json(targets: &[Target], findings: &[Finding], secs: f64, failed: bool) -> Result<()> {
    let v = json!({
        "targets": targets.iter().map(|t| t.path()).collect::<Vec<_>>(),
        "findings": findings.iter().map(finding_json).collect::<Vec<_>>(),
        "failed": failed,
        "seconds": secs,
    });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

fn level(s: Severity) -> &'static str {
    match s {
        Severity::Error => "error",
        Severity::Warning => "warning",
        Severity::Info => "note",
    }
}

/// A relative, forward-slash URI for a path (SARIF artifact locations).
fn uri(p: &std::path::Path) -> String {
    let s = p.to_string_lossy().replace('\\', "/");
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            ' ' => out.push_str("%20"),
            '%' => out.push_str("%25"),
            '#' => out.push_str("%23"),
            '?' => out.push_str("%3F"),
            c => out.push(c),
        }
    }
    out
}

/// A SARIF 2.1.0 log of `findings`.
pub fn sarif(findings: &[Finding]) -> Value {
    let rules: Vec<Value> = RULES
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "name": r.name,
                "shortDescription": {"text": r.summary},
                "fullDescription": {"text": r.rationale},
                "help": {"text": format!("{} {}", r.summary, r.rationale)},
                "defaultConfiguration": {"level": level(r.severity)},
            })
        })
        .collect();
    let results: Vec<Value> = findings
        .iter()
        .map(|f| {
            let mut loc = json!({
                "physicalLocation": {"artifactLocation": {"uri": uri(&f.path)}},
            });
            if let Some(item) = &f.item {
                loc["logicalLocations"] = json!([{"name": item, "kind": "member"}]);
            }
            json!({
                "ruleId": f.rule,
                "ruleIndex": RULES.iter().position(|r| r.id == f.rule).unwrap_or(0),
                "level": level(f.severity),
                "message": {"text": f.message},
                "locations": [loc],
            })
        })
        .collect();
    json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "adapterkit",
                "version": env!("CARGO_PKG_VERSION"),
                "informationUri": "https://github.com/adapterkit/adapterkit",
                "rules": rules,
            }},
            "results": results,
        }],
    })
}

/// GitHub's workflow-command escaping: data escapes `%`, CR and LF; properties also `:` and `,`.
fn gh_escape(s: &str, property: bool) -> String {
    let mut out = s
        .replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A");
    if property {
        out = out.replace(':', "%3A").replace(',', "%2C");
    }
    out
}

fn print_github(findings: &[Finding]) {
    for f in findings {
        let cmd = match f.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "notice",
        };
        let item = f
            .item
            .as_deref()
            .map(|i| format!("{i}: "))
            .unwrap_or_default();
        println!(
            "::{cmd} file={},title={}::{}",
            gh_escape(&f.path.to_string_lossy(), true),
            gh_escape(
                &format!(
                    "{} {}",
                    f.rule,
                    check::rule(f.rule).map(|r| r.name).unwrap_or("")
                ),
                true
            ),
            gh_escape(&format!("{item}{}", f.message), false)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn github_escaping() {
        assert_eq!(gh_escape("a%b\nc", false), "a%25b%0Ac");
        assert_eq!(gh_escape("x:y,z", true), "x%3Ay%2Cz");
        assert_eq!(uri(std::path::Path::new("a b/c#d")), "a%20b/c%23d");
    }
}
