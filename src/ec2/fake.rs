//! An in-memory EC2 account for unit tests of the code above the seam.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::api::TargetState;
use crate::api::UID_TAG;
use crate::ec2::{
    CopyRequest, Ec2, Ec2Error, ImageInfo, ImageQuery, Permission, Scope, SnapshotInfo,
};

/// The account the fake's credentials belong to.
pub const OWN_ACCOUNT: &str = "123456789012";

/// An in-memory EC2 account: images and snapshots per region, and a log
/// of the mutating calls made.
#[derive(Default)]
pub struct FakeEc2 {
    pub images: Mutex<BTreeMap<(String, String), ImageInfo>>,
    pub snapshots: Mutex<BTreeMap<(String, String), SnapshotInfo>>,
    pub calls: Mutex<Vec<String>>,
    /// What uses an image, by (region, image ID).
    pub users: Mutex<BTreeMap<(String, String), Vec<String>>>,
    /// SSM parameters, by (region, name).
    pub parameters: Mutex<BTreeMap<(String, String), String>>,
}

impl FakeEc2 {
    /// Adds an image to `region`.
    pub fn put(&self, region: &str, image: ImageInfo) {
        self.images
            .lock()
            .unwrap()
            .insert((region.into(), image.id.clone()), image);
    }

    fn log(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
}

fn not_found(what: &str) -> Ec2Error {
    Ec2Error::new(format!("{what}.NotFound"), "no such thing")
}

impl Ec2 for FakeEc2 {
    async fn describe_image(&self, scope: &Scope, id: &str) -> Result<Option<ImageInfo>, Ec2Error> {
        Ok(self
            .images
            .lock()
            .unwrap()
            .get(&(scope.region.clone(), id.into()))
            .cloned())
    }
    async fn owned_image(&self, scope: &Scope, id: &str) -> Result<Option<ImageInfo>, Ec2Error> {
        self.describe_image(scope, id).await
    }
    async fn describe_images_by_ids(
        &self,
        scope: &Scope,
        ids: &[String],
    ) -> Result<Vec<ImageInfo>, Ec2Error> {
        self.log(format!("DescribeImagesByIds {scope} {}", ids.len()));
        let images = self.images.lock().unwrap();
        Ok(ids
            .iter()
            .filter_map(|id| images.get(&(scope.region.clone(), id.clone())).cloned())
            .collect())
    }
    async fn owned_images(&self, scope: &Scope, uid: &str) -> Result<Vec<ImageInfo>, Ec2Error> {
        let images = self.images.lock().unwrap();
        Ok(images
            .iter()
            .filter(|((r, _), i)| *r == scope.region && i.owned_by(uid))
            .map(|(_, i)| i.clone())
            .collect())
    }
    async fn copy_image(&self, scope: &Scope, req: &CopyRequest) -> Result<String, Ec2Error> {
        self.log(format!("CopyImage {scope} {}", req.source_image_id));
        Ok("ami-00000000000000042".into())
    }
    async fn create_tags(
        &self,
        scope: &Scope,
        ids: &[String],
        tags: &BTreeMap<String, String>,
    ) -> Result<(), Ec2Error> {
        self.log(format!("CreateTags {scope} {ids:?}"));
        for id in ids {
            if let Some(s) = self
                .snapshots
                .lock()
                .unwrap()
                .get_mut(&(scope.region.clone(), id.clone()))
            {
                s.tags.extend(tags.clone());
            }
        }
        Ok(())
    }
    async fn delete_tags(
        &self,
        scope: &Scope,
        ids: &[String],
        _keys: &[String],
    ) -> Result<(), Ec2Error> {
        self.log(format!("DeleteTags {scope} {ids:?}"));
        Ok(())
    }
    async fn deregister_image(&self, scope: &Scope, id: &str) -> Result<(), Ec2Error> {
        self.log(format!("DeregisterImage {scope} {id}"));
        let mut images = self.images.lock().unwrap();
        let key = (scope.region.clone(), id.to_owned());
        if images.get(&key).is_some_and(ImageInfo::protected) {
            return Err(Ec2Error::new(
                "OperationNotPermitted",
                "deregistration protection is enabled",
            ));
        }
        images.remove(&key);
        Ok(())
    }
    async fn describe_snapshots(
        &self,
        scope: &Scope,
        ids: &[String],
    ) -> Result<Vec<SnapshotInfo>, Ec2Error> {
        let snaps = self.snapshots.lock().unwrap();
        Ok(ids
            .iter()
            .filter_map(|id| snaps.get(&(scope.region.clone(), id.clone())).cloned())
            .collect())
    }
    async fn owned_snapshots(
        &self,
        scope: &Scope,
        uid: &str,
    ) -> Result<Vec<SnapshotInfo>, Ec2Error> {
        let snaps = self.snapshots.lock().unwrap();
        Ok(snaps
            .iter()
            .filter(|((r, _), s)| {
                *r == scope.region && s.tags.get(UID_TAG).map(String::as_str) == Some(uid)
            })
            .map(|(_, s)| s.clone())
            .collect())
    }
    async fn delete_snapshot(&self, scope: &Scope, id: &str) -> Result<(), Ec2Error> {
        self.log(format!("DeleteSnapshot {scope} {id}"));
        match self
            .snapshots
            .lock()
            .unwrap()
            .remove(&(scope.region.clone(), id.into()))
        {
            Some(_) => Ok(()),
            None => Err(not_found("InvalidSnapshot")),
        }
    }
    async fn set_launch_permissions(
        &self,
        scope: &Scope,
        image_id: &str,
        add: &[Permission],
        remove: &[Permission],
    ) -> Result<(), Ec2Error> {
        self.log(format!(
            "ModifyImageAttribute {scope} {image_id} +{add:?} -{remove:?}"
        ));
        Ok(())
    }
    async fn set_snapshot_permissions(
        &self,
        scope: &Scope,
        snapshot_id: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<(), Ec2Error> {
        self.log(format!(
            "ModifySnapshotAttribute {scope} {snapshot_id} +{add:?} -{remove:?}"
        ));
        Ok(())
    }
    async fn deprecate_image(
        &self,
        scope: &Scope,
        image_id: &str,
        at: &str,
    ) -> Result<(), Ec2Error> {
        self.log(format!("EnableImageDeprecation {scope} {image_id} {at}"));
        Ok(())
    }
    async fn own_account(&self) -> Option<String> {
        Some(OWN_ACCOUNT.into())
    }

    async fn find_images(
        &self,
        scope: &Scope,
        query: &ImageQuery,
    ) -> Result<Vec<ImageInfo>, Ec2Error> {
        let images = self.images.lock().unwrap();
        let prefix = query.name.as_deref().map(|n| n.trim_end_matches('*'));
        Ok(images
            .iter()
            .filter(|((r, _), i)| *r == scope.region && i.state == TargetState::Available)
            .filter(|(_, i)| {
                prefix.is_none_or(|p| i.name.as_deref().is_some_and(|n| n.starts_with(p)))
            })
            .filter(|(_, i)| query.tags.iter().all(|(k, v)| i.tags.get(k) == Some(v)))
            .map(|(_, i)| i.clone())
            .collect())
    }

    async fn set_deregistration_protection(
        &self,
        scope: &Scope,
        image_id: &str,
        on: bool,
    ) -> Result<(), Ec2Error> {
        self.log(format!("DeregistrationProtection {scope} {image_id} {on}"));
        let mut images = self.images.lock().unwrap();
        let image = images
            .get_mut(&(scope.region.clone(), image_id.into()))
            .ok_or_else(|| not_found("InvalidAMIID"))?;
        image.deregistration_protection = Some(
            if on {
                "enabled-without-cooldown"
            } else {
                "disabled"
            }
            .into(),
        );
        Ok(())
    }
    async fn disable_image(&self, scope: &Scope, image_id: &str) -> Result<(), Ec2Error> {
        self.log(format!("DisableImage {scope} {image_id}"));
        let mut images = self.images.lock().unwrap();
        let image = images
            .get_mut(&(scope.region.clone(), image_id.into()))
            .ok_or_else(|| not_found("InvalidAMIID"))?;
        image.state = TargetState::Other("disabled".into());
        Ok(())
    }
    async fn images_in_use(
        &self,
        scope: &Scope,
        image_ids: &[String],
    ) -> Result<BTreeMap<String, Vec<String>>, Ec2Error> {
        self.log(format!("ImagesInUse {scope} {}", image_ids.len()));
        let users = self.users.lock().unwrap();
        Ok(image_ids
            .iter()
            .filter_map(|id| {
                let u = users.get(&(scope.region.clone(), id.clone()))?;
                Some((id.clone(), u.clone()))
            })
            .collect())
    }
    async fn get_parameter(&self, scope: &Scope, name: &str) -> Result<Option<String>, Ec2Error> {
        let params = self.parameters.lock().unwrap();
        Ok(params.get(&(scope.region.clone(), name.into())).cloned())
    }
    async fn put_parameter(
        &self,
        scope: &Scope,
        name: &str,
        image_id: &str,
    ) -> Result<(), Ec2Error> {
        self.log(format!("PutParameter {scope} {name} {image_id}"));
        self.parameters
            .lock()
            .unwrap()
            .insert((scope.region.clone(), name.into()), image_id.into());
        Ok(())
    }
    async fn delete_parameter(&self, scope: &Scope, name: &str) -> Result<(), Ec2Error> {
        self.log(format!("DeleteParameter {scope} {name}"));
        self.parameters
            .lock()
            .unwrap()
            .remove(&(scope.region.clone(), name.into()));
        Ok(())
    }
}
