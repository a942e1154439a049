//! `DescribeNetworkInterfaces` features moto lacks: some `attachment.*` filters (moto
//! answers HTTP 500) and pagination (moto ignores `MaxResults` / `NextToken`).

use std::collections::BTreeMap;

use super::Params;
use super::xml::{self, Edits};

/// Filters evaluated by the proxy, by name, with the `<attachment>` child they test.
const EMULATED: [(&str, &str); 4] = [
    ("attachment.status", "status"),
    ("attachment.device-index", "deviceIndex"),
    ("attachment.network-card-index", "networkCardIndex"),
    ("attachment.delete-on-termination", "deleteOnTermination"),
];

const TOKEN_PREFIX: &str = "ec2-faults-";

/// What the proxy does itself for one describe call.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Plan {
    /// Filters applied to moto's answer: (`<attachment>` child, accepted values).
    pub filters: Vec<(&'static str, Vec<String>)>,
    /// `(offset, MaxResults)` when paginating.
    pub page: Option<(usize, usize)>,
}

/// A bad `NextToken`.
#[derive(Debug, thiserror::Error)]
#[error("Invalid NextToken '{0}'")]
pub struct BadToken(pub String);

/// Form parameters, in order.
pub type Pairs = Vec<(String, String)>;

/// Splits a describe request into what moto gets (`Some(params)` when they differ from
/// the request) and what the proxy applies to the answer.
pub fn plan(
    params: &Params,
    filters: bool,
    paginate: bool,
) -> Result<(Plan, Option<Pairs>), BadToken> {
    let mut plan = Plan::default();
    // Filter.N.Name / Filter.N.Value.M, by N.
    let mut by_index: BTreeMap<u64, (Option<String>, Vec<String>)> = BTreeMap::new();
    let mut rest = Vec::new();
    let mut max_results = None;
    let mut next_token = None;
    for (k, v) in &params.0 {
        let filter = k
            .strip_prefix("Filter.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(n, field)| n.parse::<u64>().ok().map(|n| (n, field)));
        match filter {
            Some((n, "Name")) => by_index.entry(n).or_default().0 = Some(v.clone()),
            Some((n, field)) if field.starts_with("Value.") => {
                by_index.entry(n).or_default().1.push(v.clone())
            }
            _ if paginate && k == "MaxResults" => max_results = v.trim().parse::<usize>().ok(),
            _ if paginate && k == "NextToken" => next_token = Some(v.clone()),
            _ => rest.push((k.clone(), v.clone())),
        }
    }
    let mut changed = false;
    let mut kept = Vec::new();
    for (_, (name, values)) in by_index {
        let emulated = name
            .as_deref()
            .and_then(|n| EMULATED.iter().find(|(f, _)| *f == n));
        match emulated {
            Some((_, child)) if filters => {
                plan.filters.push((child, values));
                changed = true;
            }
            _ => kept.push((name, values)),
        }
    }
    if paginate && (max_results.is_some() || next_token.is_some()) {
        let offset = match &next_token {
            None => 0,
            Some(t) => t
                .strip_prefix(TOKEN_PREFIX)
                .and_then(|o| o.parse().ok())
                .ok_or_else(|| BadToken(t.clone()))?,
        };
        plan.page = Some((offset, max_results.unwrap_or(1000).max(1)));
        changed = true;
    } else {
        // Not paginating: give them back to moto as they were.
        if let Some(m) = max_results {
            rest.push(("MaxResults".into(), m.to_string()));
        }
    }
    if !changed {
        return Ok((plan, None));
    }
    // Renumber the remaining filters from 1: moto stops at the first missing index.
    for (i, (name, values)) in kept.into_iter().enumerate() {
        let n = i + 1;
        if let Some(name) = name {
            rest.push((format!("Filter.{n}.Name"), name));
        }
        for (j, v) in values.into_iter().enumerate() {
            rest.push((format!("Filter.{n}.Value.{}", j + 1), v));
        }
    }
    Ok((plan, Some(rest)))
}

/// Applies the plan to a successful `DescribeNetworkInterfaces` answer.
pub fn apply(doc: &str, plan: &Plan) -> Result<String, xml::XmlError> {
    let root = xml::parse(doc)?;
    let Some(set) = root.find_all("networkInterfaceSet").into_iter().next() else {
        return Ok(doc.to_string());
    };
    let mut edits = Edits::default();
    let matching: Vec<_> = set
        .children
        .iter()
        .filter(|item| {
            let Some(att) = item.child("attachment") else {
                return plan.filters.is_empty();
            };
            plan.filters.iter().all(|(child, values)| {
                let v = att.child_text(child).unwrap_or_default();
                let v = if v.is_empty() && *child == "networkCardIndex" {
                    "0"
                } else {
                    v
                };
                values.iter().any(|want| want == v)
            })
        })
        .collect();
    let (offset, max) = plan.page.unwrap_or((0, usize::MAX));
    let end = offset.saturating_add(max);
    for item in &set.children {
        let position = matching.iter().position(|m| std::ptr::eq(*m, item));
        let keep = position.is_some_and(|p| p >= offset && p < end);
        if !keep {
            edits.replace(item.outer.clone(), "");
        }
    }
    if plan.page.is_some() && end < matching.len() {
        edits.insert(
            set.outer.end,
            format!("<nextToken>{TOKEN_PREFIX}{end}</nextToken>"),
        );
    }
    Ok(edits.apply(doc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(s: &str) -> Params {
        Params::parse(None, s.as_bytes())
    }

    #[test]
    fn untouched_without_emulated_filters_or_paging() -> Result<(), BadToken> {
        let p = params("Action=DescribeNetworkInterfaces&Filter.1.Name=tag-key&Filter.1.Value.1=x");
        assert_eq!(plan(&p, true, true)?.1, None);
        let p = params("Action=DescribeNetworkInterfaces&MaxResults=5");
        assert_eq!(plan(&p, true, false)?.1, None);
        Ok(())
    }

    #[test]
    fn strips_and_renumbers() -> Result<(), BadToken> {
        let p = params(
            "Action=DescribeNetworkInterfaces&Filter.1.Name=attachment.status&Filter.1.Value.1=attached&Filter.1.Value.2=attaching&Filter.2.Name=tag-key&Filter.2.Value.1=owner&MaxResults=5&NextToken=ec2-faults-5",
        );
        let (plan, forwarded) = plan(&p, true, true)?;
        assert_eq!(
            plan.filters,
            [(
                "status",
                vec!["attached".to_string(), "attaching".to_string()]
            )]
        );
        assert_eq!(plan.page, Some((5, 5)));
        let forwarded = forwarded.unwrap_or_default();
        let get = |k: &str| {
            forwarded
                .iter()
                .find(|(a, _)| a == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("Filter.1.Name"), Some("tag-key"));
        assert_eq!(get("Filter.1.Value.1"), Some("owner"));
        assert_eq!(get("Filter.2.Name"), None);
        assert_eq!(get("MaxResults"), None);
        assert_eq!(get("NextToken"), None);
        assert!(super::plan(&params("NextToken=zzz"), true, true).is_err());
        Ok(())
    }

    fn item(eni: &str, status: Option<&str>) -> String {
        let att = status
            .map(|s| format!("<attachment><attachmentId>a-{eni}</attachmentId><deviceIndex>1</deviceIndex><status>{s}</status></attachment>"))
            .unwrap_or_default();
        format!(
            "<item>{att}<networkInterfaceId>{eni}</networkInterfaceId><tagSet><item><key>k</key></item></tagSet></item>"
        )
    }

    fn enis(doc: &str) -> Vec<String> {
        let root = xml::parse(doc).unwrap_or_default();
        root.find_all("networkInterfaceSet")
            .first()
            .map(|s| {
                s.children
                    .iter()
                    .filter_map(|i| i.child_text("networkInterfaceId").map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn filters_and_pages() -> Result<(), xml::XmlError> {
        let doc = format!(
            "<DescribeNetworkInterfacesResponse><networkInterfaceSet>{}{}{}{}</networkInterfaceSet><requestId>r</requestId></DescribeNetworkInterfacesResponse>",
            item("eni-1", Some("attached")),
            item("eni-2", None),
            item("eni-3", Some("attaching")),
            item("eni-4", Some("attached")),
        );
        let attached = Plan {
            filters: vec![("status", vec!["attached".into()])],
            page: None,
        };
        assert_eq!(enis(&apply(&doc, &attached)?), ["eni-1", "eni-4"]);

        let page = |offset| Plan {
            filters: vec![],
            page: Some((offset, 3)),
        };
        let first = apply(&doc, &page(0))?;
        assert_eq!(enis(&first), ["eni-1", "eni-2", "eni-3"]);
        let root = xml::parse(&first)?;
        assert_eq!(root.find_text("nextToken"), Some("ec2-faults-3"));
        let second = apply(&doc, &page(3))?;
        assert_eq!(enis(&second), ["eni-4"]);
        assert_eq!(xml::parse(&second)?.find_text("nextToken"), None);
        Ok(())
    }
}
