//! The form in which the watch reads and caches AmiCopies.
//!
//! A typed AmiCopy lays out every optional field of every target, condition
//! and generation in full, several times the memory of the JSON the API
//! server sent; with tens of thousands of objects the cache was most of the
//! operator's heap. The watch reads each object's metadata typed (its
//! predicates and the controller read it) and keeps its spec and status as
//! the JSON received, without building a tree of it, LZ4-compressed against
//! a dictionary of what AmiCopy JSON repeats (field names, regions, condition
//! reasons and messages): a typical status keeps a quarter of its size. A
//! reconcile reads them typed once, when it starts. Any spec and status
//! deserialize here, so an object the AmiCopy types cannot read never fails
//! the watch: intake checks them and reports such an object instead.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::LazyLock;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::Resource;
use kube::api::{DynamicObject, TypeMeta};
use kube::runtime::reflector::ObjectRef;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::api::{AmiCopy, AmiCopySpec, AmiCopyStatus};

/// An AmiCopy as the watch reads it and the cache keeps it.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct CachedAmiCopy {
    #[serde(deserialize_with = "metadata")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<Packed>,
    #[serde(default)]
    status: Option<Packed>,
}

/// JSON as received, LZ4-compressed against [`DICTIONARY`] (its size first).
#[derive(Clone)]
struct Packed(Box<[u8]>);

/// A spec and a status of every field, in the API server's form (keys in
/// order, no spaces): what most objects repeat is found here instead of
/// being kept once per object. A field missing here costs only memory.
static DICTIONARY: LazyLock<String> = LazyLock::new(|| {
    let sample: serde_json::Value =
        serde_json::from_str(include_str!("dictionary.json")).unwrap_or_default();
    sample.to_string()
});

impl Packed {
    fn new(json: &str) -> Self {
        let packed = lz4_flex::block::compress_prepend_size_with_dict(
            json.as_bytes(),
            DICTIONARY.as_bytes(),
        );
        Self(packed.into_boxed_slice())
    }

    /// The JSON it was made from.
    fn json(&self) -> serde_json::Result<String> {
        use serde::de::Error as _;
        let bytes =
            lz4_flex::block::decompress_size_prepended_with_dict(&self.0, DICTIONARY.as_bytes())
                .map_err(|e| serde_json::Error::custom(format!("cached JSON: {e}")))?;
        String::from_utf8(bytes).map_err(|e| serde_json::Error::custom(format!("cached JSON: {e}")))
    }

    fn raw(&self) -> serde_json::Result<Box<RawValue>> {
        RawValue::from_string(self.json()?)
    }
}

impl<'de> Deserialize<'de> for Packed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        Ok(Self::new(raw.get()))
    }
}

impl Serialize for Packed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        self.raw().map_err(S::Error::custom)?.serialize(s)
    }
}

impl fmt::Debug for Packed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.json() {
            Ok(json) => f.write_str(&json),
            Err(e) => write!(f, "<{e}>"),
        }
    }
}

/// kubectl's copy of the last applied manifest, which the operator never reads.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The metadata the operator reads. managedFields (a tree of every field's
/// manager, larger than the rest of the metadata) are skipped unread, and
/// kubectl's copy of the last applied manifest is dropped: every watch event
/// and status write brings them.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    name: Option<String>,
    generate_name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    generation: Option<i64>,
    creation_timestamp: Option<Time>,
    deletion_timestamp: Option<Time>,
    deletion_grace_period_seconds: Option<i64>,
    finalizers: Option<Vec<String>>,
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
    owner_references: Option<Vec<OwnerReference>>,
}

fn metadata<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = Metadata::deserialize(d)?;
    let annotations = m.annotations.map(|mut a| {
        a.remove(LAST_APPLIED);
        a
    });
    Ok(ObjectMeta {
        name: m.name,
        generate_name: m.generate_name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        generation: m.generation,
        creation_timestamp: m.creation_timestamp,
        deletion_timestamp: m.deletion_timestamp,
        deletion_grace_period_seconds: m.deletion_grace_period_seconds,
        finalizers: m.finalizers,
        labels: m.labels,
        annotations,
        owner_references: m.owner_references,
        managed_fields: None,
        self_link: None,
    })
}

impl CachedAmiCopy {
    /// The typed object.
    pub fn read(&self) -> serde_json::Result<AmiCopy> {
        let spec: AmiCopySpec = match &self.spec {
            Some(spec) => serde_json::from_str(&spec.json()?)?,
            None => serde_json::from_str("null")?,
        };
        let status = match &self.status {
            Some(status) => serde_json::from_str::<Option<AmiCopyStatus>>(&status.json()?)?,
            None => None,
        };
        let mut obj = AmiCopy::new(self.metadata.name.as_deref().unwrap_or_default(), spec);
        obj.metadata = self.metadata.clone();
        obj.status = status;
        Ok(obj)
    }

    /// The object as untyped JSON, for reporting on one that does not read.
    pub fn untyped(self) -> DynamicObject {
        let value = |packed: Option<Packed>| {
            packed
                .and_then(|p| serde_json::from_str::<serde_json::Value>(&p.json().ok()?).ok())
                .unwrap_or_default()
        };
        DynamicObject {
            types: Some(TypeMeta::resource::<AmiCopy>()),
            metadata: self.metadata,
            data: serde_json::json!({"spec": value(self.spec), "status": value(self.status)}),
        }
    }
}

impl Resource for CachedAmiCopy {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        AmiCopy::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        AmiCopy::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        AmiCopy::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        AmiCopy::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The key of an object, in either form, by its name and namespace only
/// (a key from `ObjectRef::from_obj` also holds the resourceVersion and UID,
/// strings that maps keeping one key per object would keep too).
pub fn key_of<K: Resource<DynamicType = ()>, R: Resource<DynamicType = ()>>(
    obj: &K,
) -> ObjectRef<R> {
    let key = ObjectRef::new(obj.meta().name.as_deref().unwrap_or_default());
    match &obj.meta().namespace {
        Some(ns) => key.within(ns),
        None => key,
    }
}

/// The same object's key in the other form's terms (name and namespace;
/// nothing else).
pub fn key<A: Resource<DynamicType = ()>, B: Resource<DynamicType = ()>>(
    of: &ObjectRef<A>,
) -> ObjectRef<B> {
    let key = ObjectRef::new(&of.name);
    match &of.namespace {
        Some(ns) => key.within(ns),
        None => key,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn reads_back_what_it_kept_and_any_json_deserializes() {
        let obj = json!({
            "apiVersion": "amicopy.dev/v1alpha1", "kind": "AmiCopy",
            "metadata": {"name": "a", "namespace": "ns", "generation": 3, "uid": "u-1",
                         "resourceVersion": "42", "finalizers": ["amicopy.dev/cleanup"],
                         "labels": {"team": "images"},
                         "annotations": {LAST_APPLIED: "{}", "amicopy.dev/paused": "true"},
                         "managedFields": [{"manager": "kubectl", "operation": "Apply",
                                            "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}],
                         "creationTimestamp": "2026-12-03T10:00:00Z",
                         "deletionTimestamp": "2026-12-03T11:00:00Z",
                         "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap",
                                              "name": "o", "uid": "u-0"}]},
            "spec": {"source": {"region": "us-east-1", "imageId": "ami-12345678"},
                     "destinations": [{"region": "eu-west-1"}]},
            "status": {"observedGeneration": 3,
                       "destinations": [{"region": "eu-west-1", "state": "pending",
                                         "imageId": "ami-0123456789abcdef0"}]},
        });
        let cached: CachedAmiCopy = serde_json::from_value(obj.clone()).unwrap();
        let typed = cached.read().unwrap();
        let full: ObjectMeta = serde_json::from_value(obj["metadata"].clone()).unwrap();
        let mut kept = full.clone();
        kept.managed_fields = None;
        kept.annotations.as_mut().unwrap().remove(LAST_APPLIED);
        assert_eq!(
            typed.metadata, kept,
            "all but managedFields and the last applied copy"
        );
        assert!(full.managed_fields.is_some());
        assert_eq!(typed.spec.destinations[0].region, "eu-west-1");
        let status = typed.status.unwrap();
        assert_eq!(
            status.destinations[0].image_id.as_deref(),
            Some("ami-0123456789abcdef0")
        );
        let mut no_status = obj.clone();
        no_status["status"] = serde_json::Value::Null;
        let cached: CachedAmiCopy = serde_json::from_value(no_status).unwrap();
        assert!(cached.read().unwrap().status.is_none());

        let mut bad = obj;
        bad["spec"] = json!({"destinations": 42});
        let cached: CachedAmiCopy = serde_json::from_value(bad).expect("any spec deserializes");
        assert!(cached.read().is_err());
        let untyped = cached.untyped();
        assert_eq!(untyped.data["spec"]["destinations"], 42);
        assert_eq!(untyped.data["status"]["observedGeneration"], 3);
        assert_eq!(untyped.types.unwrap().kind, "AmiCopy");
    }

    #[test]
    fn the_dictionary_names_only_fields_the_types_have() {
        let sample: serde_json::Value =
            serde_json::from_str(include_str!("dictionary.json")).unwrap();
        let spec: AmiCopySpec = serde_json::from_value(sample["spec"].clone()).unwrap();
        let status: AmiCopyStatus = serde_json::from_value(sample["status"].clone()).unwrap();
        // A misspelt or retired field would not come back.
        assert_eq!(serde_json::to_value(spec).unwrap(), sample["spec"]);
        assert_eq!(serde_json::to_value(status).unwrap(), sample["status"]);
    }

    #[test]
    fn a_typical_status_is_kept_in_a_fraction_of_its_json() {
        let conditions: Vec<_> = ["Ready", "Progressing", "Degraded", "Reconciling", "Stalled"]
            .iter()
            .map(|t| {
                json!({"lastTransitionTime": "2026-12-03T21:20:37Z",
                       "message": "nothing needs attention", "observedGeneration": 1,
                       "reason": "AsExpected", "status": "False", "type": t})
            })
            .collect();
        let destinations: Vec<_> = ["eu-west-1", "ap-southeast-2", "us-west-2"]
            .iter()
            .enumerate()
            .map(|(i, r)| {
                json!({"encrypted": false, "generation": 1,
                       "imageId": format!("ami-6641da48eb6e64fe{i}"),
                       "plannedAt": "2026-12-03T21:20:09Z", "region": r,
                       "sourceImageId": "ami-607c2e0e96aa8fbbe", "state": "available"})
            })
            .collect();
        let status = json!({
            "available": "3/3", "conditions": conditions, "destinations": destinations,
            "observedGeneration": 1, "sourceImageId": "ami-607c2e0e96aa8fbbe",
        })
        .to_string();
        let packed = Packed::new(&status);
        assert_eq!(packed.json().unwrap(), status);
        assert!(
            packed.0.len() * 4 < status.len(),
            "{} bytes kept of {}",
            packed.0.len(),
            status.len()
        );
        let serialized = serde_json::to_string(&packed).unwrap();
        assert_eq!(serialized, status);
    }

    #[test]
    fn keys_carry_name_and_namespace_across_forms() {
        let k = ObjectRef::<AmiCopy>::new("a").within("ns");
        let c: ObjectRef<CachedAmiCopy> = key(&k);
        assert_eq!((c.name.as_str(), c.namespace.as_deref()), ("a", Some("ns")));
        assert_eq!(key::<CachedAmiCopy, AmiCopy>(&c), k);
    }
}
