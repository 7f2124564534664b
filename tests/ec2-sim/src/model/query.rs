//! What describe calls share: filters with EC2's wildcards, pages and owner
//! lists.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;

use super::tags::Tags;
use crate::wire::{ApiError, ApiResult};

/// A filter over describe results: any value may match (`*` and `?` work).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub name: String,
    pub values: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    pub max_results: Option<i64>,
    pub next_token: Option<String>,
}

/// Glob match with EC2's filter wildcards: `*` any run, `?` one character.
pub fn wildcard(pattern: &str, value: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let v: Vec<char> = value.chars().collect();
    let (mut pi, mut vi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        match p.get(pi) {
            Some('\\') if p.get(pi + 1) == Some(&v[vi]) => {
                pi += 2;
                vi += 1;
            }
            Some('?') => {
                pi += 1;
                vi += 1;
            }
            Some('*') => {
                star = Some((pi, vi));
                pi += 1;
            }
            Some(c) if *c == v[vi] => {
                pi += 1;
                vi += 1;
            }
            _ => match star {
                Some((sp, sv)) => {
                    pi = sp + 1;
                    vi = sv + 1;
                    star = Some((sp, sv + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// The IDs a query names: its ID list, or else the values of an `id_filter`
/// filter without wildcards. `None` when it names none.
pub(super) fn named_ids<'a>(
    ids: &'a [String],
    filters: &'a [Filter],
    id_filter: &str,
) -> Option<BTreeSet<&'a str>> {
    if !ids.is_empty() {
        return Some(ids.iter().map(String::as_str).collect());
    }
    filters
        .iter()
        .find(|f| f.name == id_filter && f.values.iter().all(|v| is_literal(v)))
        .map(|f| f.values.iter().map(String::as_str).collect())
}

/// The entries of `all` with the given IDs, in ID order; all of them when
/// `ids` is `None`.
pub(super) fn among<'a: 'b, 'b, T>(
    all: &'a BTreeMap<String, T>,
    ids: Option<&'b BTreeSet<&'b str>>,
) -> Box<dyn Iterator<Item = (&'a String, &'a T)> + 'b> {
    match ids {
        Some(ids) => Box::new(ids.iter().filter_map(|id| all.get_key_value(*id))),
        None => Box::new(all.iter()),
    }
}

/// Whether a filter value matches only itself (no `*`, `?` or escape).
pub(super) fn is_literal(value: &str) -> bool {
    !value.contains(['*', '?', '\\'])
}

pub(super) fn tag_filter_values(tags: &Tags, name: &str) -> Option<Vec<String>> {
    if let Some(key) = name.strip_prefix("tag:") {
        return Some(tags.get(key).cloned().into_iter().collect());
    }
    match name {
        "tag-key" => Some(tags.keys().cloned().collect()),
        "tag-value" => Some(tags.values().cloned().collect()),
        _ => None,
    }
}

pub(super) fn matches_filters<T>(
    item: &T,
    filters: &[Filter],
    values_of: impl Fn(&T, &str) -> Option<Vec<String>>,
) -> ApiResult<bool> {
    for filter in filters {
        let values = values_of(item, &filter.name).ok_or_else(|| {
            ApiError::client(
                "InvalidParameterValue",
                format!("The filter '{}' is invalid", filter.name),
            )
        })?;
        let hit = filter
            .values
            .iter()
            .any(|pattern| values.iter().any(|v| wildcard(pattern, v)));
        if !hit {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Items sorted by key; a page starts after the key the token names. Keys
/// are resource IDs, or built from them where one resource holds several
/// items (launch template versions).
pub(super) fn paginate<K: AsRef<str>, T>(
    items: Vec<(K, T)>,
    page: &Page,
) -> ApiResult<(Vec<T>, Option<String>)> {
    let start = match &page.next_token {
        None => 0,
        Some(token) => {
            let after = hex::decode(token)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    ApiError::client(
                        "InvalidPaginationToken",
                        format!("The pagination token '{token}' is invalid"),
                    )
                })?;
            items.partition_point(|(key, _)| key.as_ref() <= after.as_str())
        }
    };
    let mut rest: Vec<(K, T)> = items.into_iter().skip(start).collect();
    let token = match page.max_results {
        Some(max) if (max as usize) < rest.len() => {
            rest.truncate(max as usize);
            rest.last().map(|(key, _)| hex::encode(key.as_ref()))
        }
        _ => None,
    };
    Ok((rest.into_iter().map(|(_, item)| item).collect(), token))
}

/// `MaxResults` must lie in `limits`, which differ by action (DescribeImages
/// 1–1000, DescribeLaunchTemplateVersions 1–200, DescribeInstances 5–1000).
pub(super) fn check_page(page: &Page, limits: RangeInclusive<i64>) -> ApiResult<()> {
    match page.max_results {
        Some(n) if !limits.contains(&n) => Err(ApiError::invalid_value(
            "MaxResults",
            &n.to_string(),
            &format!("Must be between {} and {}.", limits.start(), limits.end()),
        )),
        _ => Ok(()),
    }
}

pub(super) fn resolve_owners(owners: &[String], account: &str) -> Vec<String> {
    owners
        .iter()
        .map(|o| {
            if o == "self" {
                account.to_string()
            } else {
                o.clone()
            }
        })
        .collect()
}
