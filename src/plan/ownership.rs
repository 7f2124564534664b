//! Whether an image is this object's to change or destroy. An image is the
//! object's when it carries the object's UID tag and, where EC2 says what it
//! was copied from, that is the source its `amicopy.dev/source-image` tag
//! names. Anyone who copies one of our copies with its tags (CopyImageTags)
//! gets the UID tag too; EC2's SourceImageId then names our copy, not the
//! source, and the image is left alone.

use crate::api::SOURCE_TAG;
use crate::ec2::ImageInfo;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ownership {
    Ours,
    /// EC2 did not return the image just now (not listed yet, gone, or
    /// another account's): look again later, never take it as gone.
    Unseen,
    /// Not this object's, and why.
    Foreign(String),
}

/// Judges an image as EC2 just reported it (`None`: not returned).
pub fn check(image: Option<&ImageInfo>, uid: &str) -> Ownership {
    let Some(image) = image else {
        return Ownership::Unseen;
    };
    if !image.owned_by(uid) {
        return Ownership::Foreign("it does not carry this object's amicopy.dev/uid tag".into());
    }
    let Some(tagged) = image.tags.get(SOURCE_TAG) else {
        return Ownership::Foreign("it carries no amicopy.dev/source-image tag".into());
    };
    match &image.source_image_id {
        Some(actual) if actual != tagged => Ownership::Foreign(format!(
            "EC2 says it is a copy of {actual}, but its amicopy.dev/source-image tag says {tagged}"
        )),
        _ => Ownership::Ours,
    }
}

/// A copy whose ID the status recorded from this object's own CopyImage
/// (`recorded_source`: the source it was copied from), that EC2 shows with
/// no owner's tag at all: the peer ignored the TagSpecifications of the
/// copy. It is this object's, to tag, when EC2 shows what this object's
/// copies are: named `<base>-<source>` (names are unique in a region, and
/// CopyImage refuses a taken one) and, where EC2 says, copied from that
/// source. An image tagged by anyone is judged by [`check`] instead.
pub fn untagged_copy(image: &ImageInfo, recorded_source: &str) -> bool {
    let named = image
        .name
        .as_deref()
        .is_some_and(|n| n.ends_with(&format!("-{recorded_source}")));
    named
        && !image.tags.contains_key(crate::api::UID_TAG)
        && image
            .source_image_id
            .as_deref()
            .is_none_or(|s| s == recorded_source)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::api::UID_TAG;

    fn image(tags: &[(&str, &str)], source: Option<&str>) -> ImageInfo {
        ImageInfo {
            id: "ami-0000000000000000a".into(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            source_image_id: source.map(str::to_owned),
            ..ImageInfo::default()
        }
    }

    #[test]
    fn only_an_image_with_the_uid_and_a_matching_source_is_ours() {
        const SRC: &str = "ami-00000000000000001";
        let ours = [(UID_TAG, "u1"), (SOURCE_TAG, SRC)];
        let foreign = |o: Ownership| matches!(o, Ownership::Foreign(_));
        assert_eq!(check(Some(&image(&ours, Some(SRC))), "u1"), Ownership::Ours);
        assert_eq!(
            check(Some(&image(&ours, None)), "u1"),
            Ownership::Ours,
            "a peer that does not report the source: the tags decide"
        );
        assert_eq!(check(None, "u1"), Ownership::Unseen);
        assert!(foreign(check(Some(&image(&ours, Some(SRC))), "u2")));
        assert!(foreign(check(
            Some(&image(&[(UID_TAG, "u1")], Some(SRC))),
            "u1"
        )));
        let copy_of_our_copy = check(Some(&image(&ours, Some("ami-0000000000000000b"))), "u1");
        assert!(
            matches!(&copy_of_our_copy, Ownership::Foreign(why) if why.contains("ami-0000000000000000b")),
            "{copy_of_our_copy:?}"
        );
    }

    #[test]
    fn an_untagged_copy_of_the_recorded_source_is_ours_to_tag() {
        const SRC: &str = "ami-00000000000000001";
        let named = |tags: &[(&str, &str)], source: Option<&str>, name: &str| ImageInfo {
            name: Some(name.into()),
            ..image(tags, source)
        };
        let ours = format!("golden-{SRC}");
        assert!(untagged_copy(&named(&[], Some(SRC), &ours), SRC));
        assert!(untagged_copy(&named(&[("team", "a")], None, &ours), SRC));
        assert!(
            !untagged_copy(&named(&[], Some(SRC), "someone-elses"), SRC),
            "not named as this object's copies are"
        );
        assert!(!untagged_copy(&image(&[], Some(SRC)), SRC), "no name");
        assert!(!untagged_copy(
            &named(&[], Some("ami-0000000000000000b"), &ours),
            SRC
        ));
        assert!(
            !untagged_copy(&named(&[(UID_TAG, "u2")], Some(SRC), &ours), SRC),
            "another owner's"
        );
    }
}
